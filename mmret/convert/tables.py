"""Conversion tables keyed by the Hugging Face ``model_type`` (as the backbones are in
:mod:`mmret.models.registry`).

:data:`BUILTIN` maps a model_type to the module whose ``TABLE`` is its
:class:`~mmret.convert.table.ConversionTable`, imported on first use; :func:`register` adds others.
"""

from __future__ import annotations

import importlib

from mmret.convert.hf import ConversionError
from mmret.convert.table import ConversionTable

#: model_type -> module defining ``TABLE``.
BUILTIN: dict[str, str] = {
    "qwen2_vl": "mmret.convert.qwen2_vl_table",
    "qwen2_5_vl": "mmret.convert.qwen2_5_vl_table",
    "qwen3_vl": "mmret.convert.qwen3_vl_table",
}

_registered: dict[str, ConversionTable] = {}


def register(model_type: str, table: ConversionTable, *, replace: bool = False) -> ConversionTable:
    """Make ``table`` the conversion table of ``model_type``; an error if it has one (unless ``replace``)."""
    if not replace and (model_type in _registered or model_type in BUILTIN):
        raise ValueError(f"a conversion table is already registered for model_type={model_type!r}")
    _registered[model_type] = table
    return table


def unregister(model_type: str) -> None:
    """Remove a table :func:`register` added (built-in ones stay)."""
    _registered.pop(model_type, None)


def names() -> tuple[str, ...]:
    """Every model_type with a conversion table, sorted."""
    return tuple(sorted({*BUILTIN, *_registered}))


def get(model_type: str) -> ConversionTable:
    """The conversion table of ``model_type``; a ``ConversionError`` naming the model types that have one."""
    if model_type not in _registered and model_type in BUILTIN:
        _registered[model_type] = importlib.import_module(BUILTIN[model_type]).TABLE
    if model_type not in _registered:
        raise ConversionError(f"no conversion table for model_type={model_type!r}; tables exist for {list(names())}")
    return _registered[model_type]


def of_config(config: object) -> ConversionTable:
    """The conversion table of a model config (its class's ``model_type``)."""
    return get(type(config).model_type)  # type: ignore[attr-defined]
