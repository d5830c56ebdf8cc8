"""A conversion table: the one declarative mapping between a backbone's hub tensor names and our
parameter paths, and the layout changes between them.

Each :class:`Rule` pairs a hub key with our path; ``{i}`` is a block index (vision blocks or decoder
layers). With ``scan_layers`` our blocks are stacked along a leading axis and the ``.{i}`` of our path
disappears. ``kind`` names the layout change, applied one way on import (:func:`to_ours`) and inverted on
export (:func:`to_hub`). Reading (:func:`mmret.convert.hf.read_params`), writing
(:func:`mmret.convert.hf.write_tensors`) and relayout read a table and nothing else. One table per
backbone, registered by ``model_type`` in :mod:`mmret.convert.tables`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

#: ``linear``: torch Linear weight [out, in] <-> kernel [in, out]. ``patch_embed``: a Conv3d whose kernel
#: equals its stride [embed, C, T, P, P] <-> kernel [C*T*P*P, embed]. ``copy``: unchanged.
Kind = Literal["copy", "linear", "patch_embed"]

ParamPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    hub: str
    ours: str
    kind: Kind = "copy"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One hub tensor and where it lives in our parameters."""

    hub: str
    path: ParamPath  # our nnx state path
    kind: Kind
    layer: int | None  # block index for a stacked (scanned) parameter


@dataclasses.dataclass(frozen=True)
class ConversionTable:
    """One backbone's rules plus the few facts about its config they need.

    ``depth(config, hub_pattern)`` is the number of blocks a ``{i}`` rule runs over;
    ``patch_embed_shape(config)`` the hub shape of a ``patch_embed`` tensor; ``hub_aliases`` are
    (prefix, canonical prefix) pairs of other layouts the same tensors are saved in. ``lm_head`` is the
    hub key of the LM head, left out for a tied model (or a model without its head) and then accepted
    but not read when a file holds it.
    """

    name: str  # for messages, e.g. "Qwen2-VL"
    rules: tuple[Rule, ...]
    depth: Callable[[Any, str], int]
    patch_embed_shape: Callable[[Any], tuple[int, ...]]
    hub_aliases: tuple[tuple[str, str], ...] = ()
    lm_head: str = "lm_head.weight"
    embed: str = "model.embed_tokens.weight"

    def canonical_hub_key(self, key: str) -> str:
        """A hub key in the table's layout, whichever layout it was saved in."""
        for alias, canonical in self.hub_aliases:
            if key.startswith(alias):
                return canonical + key[len(alias) :]
        return key

    def has_head(self, cfg: Any, *, with_lm_head: bool | None = None) -> bool:
        """Whether the LM head is a tensor of its own here (untied and wanted)."""
        with_lm_head = cfg.with_lm_head if with_lm_head is None else with_lm_head
        return with_lm_head and not cfg.tie_word_embeddings

    def entries(self, cfg: Any, *, with_lm_head: bool | None = None) -> list[Entry]:
        """The rules expanded for one architecture (block counts, tied head, scan layout)."""
        head = self.has_head(cfg, with_lm_head=with_lm_head)
        out = []
        for rule in self.rules:
            if rule.hub == self.lm_head and not head:
                continue
            if "{i}" not in rule.hub:
                out.append(Entry(rule.hub, _path(rule.ours), rule.kind, None))
                continue
            for i in range(self.depth(cfg, rule.hub)):
                if cfg.scan_layers:
                    out.append(Entry(rule.hub.format(i=i), _path(rule.ours.replace(".{i}", "")), rule.kind, i))
                else:
                    out.append(Entry(rule.hub.format(i=i), _path(rule.ours.format(i=i)), rule.kind, None))
        return out

    def hub_shape(self, cfg: Any, entry: Entry, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The hub tensor's shape, from the shape of our (unstacked) parameter."""
        if entry.kind == "linear":
            return tuple(reversed(ours_shape))
        if entry.kind == "patch_embed":
            return tuple(self.patch_embed_shape(cfg))
        return ours_shape


def _path(dotted: str) -> ParamPath:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def to_ours(x: np.ndarray, kind: Kind) -> np.ndarray:
    """Hub layout -> ours."""
    if kind == "linear":  # torch Linear weight [out, in] -> kernel [in, out]
        return np.ascontiguousarray(x.T)
    if kind == "patch_embed":  # Conv3d [embed, C, T, P, P], kernel == stride -> kernel [C*T*P*P, embed]
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    return x


def to_hub(x: np.ndarray, kind: Kind, hub_shape: tuple[int, ...]) -> np.ndarray:
    """Ours -> hub layout (the inverse of :func:`to_ours`)."""
    if kind in ("linear", "patch_embed"):
        return np.ascontiguousarray(x.T).reshape(hub_shape)
    return x
