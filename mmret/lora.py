"""LoRA adapters on ``nnx.Linear`` layers, merging them back, and what trains (freezing by path regex).

``apply_lora`` swaps each matched ``nnx.Linear`` for a :class:`LoRALinear` that keeps the original
``kernel`` / ``bias`` Variables at the same paths and adds ``lora_a`` [..., in, r] and ``lora_b``
[..., r, out] as ``nnx.LoRAParam`` (a subclass of ``nnx.Param``, so ``nnx.LoRAParam`` selects the
adapters alone). Scanned layers (kernel [L, in, out]) get stacked adapters ([L, in, r], [L, r, out])
that ``jax.lax.scan`` slices like every other block parameter. ``merge_lora`` folds
``W += alpha / r * A @ B`` and restores plain ``nnx.Linear`` modules: the model's parameters are then
exactly those of the model before ``apply_lora`` (paths, shapes, dtypes), so it converts and exports
as any other checkpoint.

Paths are matched with ``re.fullmatch`` against the dot-joined path, e.g.
``language_model.layers.layers.self_attn.q_proj`` (scanned) or
``language_model.layers.layers.0.self_attn.q_proj`` (unscanned); parameter paths add ``.kernel``,
``.bias``, ``.lora_a``, ``.lora_b``.

Dropout (``dropout > 0``) acts on the adapter input while the model is in training mode
(``model.train()``; ``model.eval()`` turns it off). Its masks come from a per-layer key stored in a
:class:`LoRADropoutKey` Variable (not a parameter): call ``set_dropout_key(model, key)`` with a fresh
key every step (e.g. ``fold_in(seed, step)``) -- the layer stack does not write RNG state back, so an
``nnx.Rngs`` counter inside a scanned block would never advance.

Written here rather than taken from flax: ``nnx.LoRA`` / ``nnx.LoRALinear`` (flax 0.12) have neither
dropout nor a scaling ``alpha``, and nothing folds the adapters back into plain ``nnx.Linear`` modules,
which export and evaluation need; the adapters here also keep the logical axis names and stack with
scanned layers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

#: Every linear layer of the LLM's decoder blocks (U-MARVEL: "LoRA on all linear layers of the LLM").
LLM_LINEARS = r"language_model\.layers\..*\.(q|k|v|o|gate|up|down)_proj"
#: U-MARVEL freezes the vision tower and its merger.
FREEZE_VISION = (r"visual\..*",)
#: Parameters that train next to the adapters under ``lora_only`` (a learnable temperature).
ALSO_TRAIN = (r"(.*\.)?(log_)?temperature(\..*)?",)

RANK_AXIS = "lora_rank"


class LoRADropoutKey(nnx.Variable):
    """Raw PRNG key data for a LoRA layer's dropout masks (stacked like the kernel); never trained."""


def dotted(path: Iterable[Any]) -> str:
    """``('language_model', 'layers', 0, 'mlp')`` -> ``'language_model.layers.0.mlp'``."""
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class PathRegex:
    """An nnx filter: True for Variables whose dot-joined path fully matches one of ``patterns``."""

    patterns: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.patterns, str):
            object.__setattr__(self, "patterns", (self.patterns,))
        for p in self.patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"bad path regex {p!r}: {e}") from e

    def __call__(self, path: tuple, value: Any) -> bool:
        name = dotted(path)
        return any(re.fullmatch(p, name) for p in self.patterns)


def _dense(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


class LoRALinear(nnx.Module):
    """``base(x) + alpha / r * dropout(x) @ A @ B``, holding ``base``'s own kernel / bias Variables.

    A is drawn uniform in +-1/sqrt(in) (PEFT's kaiming-uniform), B is zero: the layer starts equal to
    ``base``. Leading kernel axes (a scanned stack) are kept on A, B and the dropout key.
    """

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
        kernel = base.kernel
        self.kernel = kernel
        self.bias = nnx.data(base.bias)
        for attr in _LINEAR_ATTRS:
            setattr(self, attr, getattr(base, attr))
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.dropout_rate = float(dropout)
        self.deterministic = False  # nnx convention: model.eval() sets True, model.train() False

        lead = tuple(kernel.shape[:-2])
        din, dout = kernel.shape[-2:]
        meta = kernel.get_metadata()
        names = meta.pop("out_sharding", None)
        meta.pop("sharding_names", None)
        a_meta, b_meta, key_meta = dict(meta), dict(meta), dict(meta)
        if names is not None:
            names = tuple(names)
            a_meta["out_sharding"] = names[:-1] + (RANK_AXIS,)
            b_meta["out_sharding"] = names[:-2] + (RANK_AXIS, names[-1])
            key_meta["out_sharding"] = names[:-2] + (None,)
        dtype = kernel.dtype
        bound = 1.0 / math.sqrt(din)
        a = jax.random.uniform(rngs.params(), (*lead, din, rank), dtype, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, **a_meta)
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, dout), dtype), **b_meta)
        if self.dropout_rate > 0:
            keys = jax.random.split(rngs.dropout(), math.prod(lead))
            data = jax.random.key_data(keys).reshape(*lead, -1)
            self.dropout_key = LoRADropoutKey(data, **key_meta)
        else:
            self.dropout_key = nnx.data(None)

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        a, b = self.lora_a[...], self.lora_b[...]
        x, kernel, bias, a, b = self.promote_dtype((x, kernel, bias, a, b), dtype=self.dtype)
        kw = {"out_sharding": out_sharding}
        if self.preferred_element_type is not None:
            kw["preferred_element_type"] = self.preferred_element_type
        y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kw)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        h = x
        if self.dropout_rate > 0 and not self.deterministic:
            key = jax.random.wrap_key_data(self.dropout_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
            h = jnp.where(keep, x / (1.0 - self.dropout_rate), jnp.zeros_like(x))
        low = _dense(h, a, self.precision) * jnp.asarray(self.scale, h.dtype)
        return y + _dense(low, b, self.precision).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """``W + alpha / r * A @ B`` in the kernel's dtype (full-precision matmul)."""
        w = self.kernel[...]
        delta = jnp.matmul(self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST)
        return (w + self.scale * delta.astype(w.dtype)).astype(w.dtype)


_LINEAR_ATTRS = (
    "in_features",
    "out_features",
    "use_bias",
    "dtype",
    "param_dtype",
    "precision",
    "dot_general",
    "promote_dtype",
    "preferred_element_type",
)


def _set_child(parent: Any, key: str | int, child: nnx.Module) -> None:
    if isinstance(key, int):
        parent[key] = child
    else:
        setattr(parent, key, child)


def _get(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key] if isinstance(key, int) else getattr(root, key)
    return root


def _replace(model: nnx.Module, path: tuple, child: nnx.Module) -> None:
    if not path:
        raise ValueError("cannot replace the model itself; wrap the linear layer in a module")
    _set_child(_get(model, path[:-1]), path[-1], child)


def lora_layers(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
    """The model's LoRA layers with their paths."""
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target: str = LLM_LINEARS,
    rngs: nnx.Rngs | int = 0,
) -> nnx.Module:
    """Add adapters to every ``nnx.Linear`` whose path fully matches ``target`` (in place; returns
    ``model``). The model computes exactly what it did before until A/B train."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    try:
        re.compile(target)
    except re.error as e:
        raise ValueError(f"bad LoRA target regex {target!r}: {e}") from e
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    matched, already = [], []
    for path, m in nnx.iter_modules(model):
        if re.fullmatch(target, dotted(path)):
            if isinstance(m, LoRALinear):
                already.append(dotted(path))
            elif type(m) is nnx.Linear:
                matched.append((path, m))
    if already:
        raise ValueError(f"LoRA already applied at {already[:3]}...; merge_lora first")
    if not matched:
        raise ValueError(f"LoRA target {target!r} matches no nnx.Linear layer")
    for path, m in matched:
        _replace(model, path, LoRALinear(m, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs))
    return model


def _plain_linear(m: LoRALinear) -> nnx.Linear:
    kw = {a: getattr(m, a) for a in _LINEAR_ATTRS}
    din, dout = kw.pop("in_features"), kw.pop("out_features")
    lin = nnx.eval_shape(lambda: nnx.Linear(din, dout, **kw, rngs=nnx.Rngs(0)))
    lin.kernel = m.kernel
    lin.bias = nnx.data(m.bias)
    return lin


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel and put back plain ``nnx.Linear`` layers (in place;
    returns ``model``). Afterwards ``nnx.state(model, nnx.Param)`` has the pre-LoRA paths and shapes."""
    for path, m in lora_layers(model):
        m.kernel.set_value(m.merged_kernel())
        _replace(model, path, _plain_linear(m))
    return model


def set_dropout_key(model: nnx.Module, key: jax.Array) -> None:
    """Give every LoRA dropout layer (and every layer of a stack) its own key derived from ``key``."""
    for i, (_, m) in enumerate(lora_layers(model)):
        if m.dropout_key is None:
            continue
        lead = m.dropout_key.shape[:-1]
        keys = jax.random.split(jax.random.fold_in(key, i), math.prod(lead))
        m.dropout_key.set_value(jax.random.key_data(keys).reshape(m.dropout_key.shape))


def trainable_filter(
    freeze: Sequence[str] = (),
    *,
    lora_only: bool = False,
    also_train: Sequence[str] = ALSO_TRAIN,
) -> nnx.filterlib.Filter:
    """The nnx filter of what trains, for ``nnx.Optimizer(model, tx, wrt=...)`` and
    ``nnx.DiffState(0, ...)``.

    Without ``lora_only``: every ``nnx.Param`` not matching ``freeze``. With it: the adapters
    (``nnx.LoRAParam``) plus the parameters matching ``also_train`` (a learnable temperature by
    default), minus ``freeze``. Compose further with ``nnx.All`` / ``nnx.Any`` / ``nnx.Not``.
    """
    train: Any = nnx.Param
    if lora_only:
        train = (
            nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, PathRegex(tuple(also_train)))) if also_train else nnx.LoRAParam
        )
    if freeze:
        train = nnx.All(train, nnx.Not(PathRegex(tuple(freeze))))
    return train


def count_params(model: nnx.Module, wrt: nnx.filterlib.Filter = nnx.Param) -> int:
    """Number of scalars in the Variables of ``model`` selected by ``wrt``."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, wrt)))
