"""The backbone registry, keyed by the Hugging Face ``model_type``.

Backbones that ship with mmret are listed in :data:`BUILTIN` (model_type -> the module whose ``BACKBONE``
is its :class:`~mmret.models.backbone.Backbone`), imported on first use; adding one is that module plus
one line here (and its conversion table in :mod:`mmret.convert.tables`). :func:`register` adds others at
run time.

    spec = registry.get("qwen2_vl")
    spec = registry.backbone_of(model_dir)   # from the directory's config.json
    spec = registry.find_preset("tiny")      # the backbone that has the preset
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmret.models.backbone import Backbone

#: The backbone of a processor directory that has no config.json (the tokenizer files alone).
DEFAULT_MODEL_TYPE = "qwen2_vl"

#: model_type -> module defining ``BACKBONE``.
BUILTIN: dict[str, str] = {
    "qwen2_vl": "mmret.models.qwen2_vl.backbone",
    "qwen2_5_vl": "mmret.models.qwen2_5_vl.backbone",
    "qwen3_vl": "mmret.models.qwen3_vl.backbone",
}

_registered: dict[str, Backbone] = {}


class UnknownBackboneError(ValueError):
    """A model_type no backbone is registered for; the message lists the known ones."""


class UnknownPresetError(KeyError):
    """A preset no backbone defines; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def register(spec: Backbone, *, replace: bool = False) -> Backbone:
    """Make ``spec`` findable under its ``model_type``; an error if one is there already (unless ``replace``)."""
    if not replace and spec.model_type in names():
        raise ValueError(f"a backbone is already registered for model_type={spec.model_type!r}")
    _registered[spec.model_type] = spec
    return spec


def unregister(model_type: str) -> None:
    """Remove a backbone :func:`register` added (built-in ones stay)."""
    _registered.pop(model_type, None)


def names() -> tuple[str, ...]:
    """Every known model_type, sorted."""
    return tuple(sorted({*BUILTIN, *_registered}))


def get(model_type: str) -> Backbone:
    """The backbone registered for ``model_type``; :class:`UnknownBackboneError` naming the known ones."""
    if model_type in _registered:
        return _registered[model_type]
    if model_type in BUILTIN:
        spec = importlib.import_module(BUILTIN[model_type]).BACKBONE
        if spec.model_type != model_type:
            raise RuntimeError(f"{BUILTIN[model_type]}.BACKBONE is for {spec.model_type!r}, not {model_type!r}")
        _registered[model_type] = spec
        return spec
    known = ", ".join(repr(n) for n in names())
    raise UnknownBackboneError(f"unsupported architecture: model_type={model_type!r}; known model types: {known}")


def of_config(config: Any) -> Backbone:
    """The backbone a model config belongs to (its class's ``model_type``)."""
    return get(type(config).model_type)


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """A model directory's ``config.json``: ``FileNotFoundError`` when absent, ``ValueError`` when not a
    JSON object."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model directory")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: not a JSON object")
    return hf


def model_type_of(hf: Mapping[str, Any]) -> str:
    """The ``model_type`` of a config.json dict; ``UnknownBackboneError`` when it has none."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str):
        known = ", ".join(repr(n) for n in names())
        raise UnknownBackboneError(f"config.json names no model_type; known model types: {known}")
    return model_type


def backbone_of(model_dir: str | Path, *, default: str | None = None) -> Backbone:
    """The backbone a model directory's ``config.json`` names. Without a config.json: the ``default``
    model_type's backbone when given, else ``FileNotFoundError``. Errors name the file."""
    path = Path(model_dir) / "config.json"
    if default is not None and not path.exists():
        return get(default)
    hf = read_config_json(model_dir)
    try:
        return get(model_type_of(hf))
    except UnknownBackboneError as e:
        raise UnknownBackboneError(f"{path}: {e}") from None


def presets() -> dict[str, str]:
    """Every preset name -> the model_type of the backbone that defines it (importing every backbone)."""
    out: dict[str, str] = {}
    for model_type in names():
        for name in get(model_type).presets:
            if name in out:
                raise RuntimeError(f"preset {name!r} is defined by both {out[name]!r} and {model_type!r}")
            out[name] = model_type
    return out


def find_preset(name: str) -> Backbone:
    """The backbone that defines preset ``name``; :class:`UnknownPresetError` (a ``KeyError``) listing the
    known presets."""
    known = presets()
    if name not in known:
        raise UnknownPresetError(f"unknown preset {name!r}; choose one of {sorted(known)}")
    return get(known[name])
