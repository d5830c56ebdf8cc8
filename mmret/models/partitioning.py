"""Logical axis names carried by every parameter, and the layout hook for activations.

Model code names axes logically ("embed", "mlp", ...); the sharding module maps those names to
mesh axes with a rules table from the config (maxtext style). Model code never names a mesh axis.

Activations are laid out the same way: a model calls :func:`constrain` with the logical names of an
array's dims, and :func:`shards` for how many ways a logical dim is split. Both do nothing (identity, 1)
until a layout is installed with :func:`activation_layout`, which ``mmret.sharding.axis_rules`` does with
its rules and the current mesh; so model code runs the same unsharded and never imports the sharding layer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
from flax import nnx

# Every logical name a parameter may carry. The rules table in the config maps each to a mesh axis
# (or None for replicated); this tuple is the vocabulary that table is checked against.
LOGICAL_AXES = (
    "layers",  # the stacked axis of scanned layers
    "vocab",
    "embed",  # LLM width
    "heads",  # query heads * head_dim (flattened)
    "kv_heads",  # key/value heads * head_dim (flattened)
    "mlp",  # LLM MLP width
    "norm",  # norm scales and biases
    "vision_embed",  # ViT width
    "vision_heads",  # ViT fused qkv / attention width
    "vision_mlp",  # ViT MLP width
    "vision_patch",  # flattened patch (3 * 2 * 14 * 14)
    "vision_positions",  # rows of a learned position-embedding table (Qwen3-VL)
    "merger_mlp",  # patch merger hidden width
    "lora_rank",  # the low-rank axis of LoRA adapters (mmret.lora)
)

Initializer = Callable[..., jax.Array]


def logical(init: Initializer, *names: str | None) -> Initializer:
    """Wrap an initializer so the parameter it creates carries logical axis ``names``."""
    for name in names:
        if name is not None and name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r}; known: {LOGICAL_AXES}")
    return nnx.with_partitioning(init, names, eager_sharding=False)


def logical_axes(state: Any) -> Any:
    """The logical names of every parameter in ``state`` (a pytree of ``PartitionSpec``)."""
    return nnx.get_partition_spec(state)


class ActivationLayout(Protocol):
    """What :func:`activation_layout` installs (``mmret.sharding`` provides one per rules table)."""

    def constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array: ...

    def shards(self, name: str) -> int: ...


_LAYOUT: contextvars.ContextVar[ActivationLayout | None] = contextvars.ContextVar(
    "mmret_activation_layout", default=None
)


@contextlib.contextmanager
def activation_layout(layout: ActivationLayout | None) -> Iterator[None]:
    """Make ``layout`` the one :func:`constrain` and :func:`shards` consult within the block (None: none).
    A function traced under a layout keeps its constraints: retrace after changing it."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """``x`` laid out by the logical names of its dims under the installed layout; ``x`` itself without one."""
    layout = _LAYOUT.get()
    if layout is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} logical names {names} for an array of rank {x.ndim}")
    return layout.constrain(x, names)


def shards(name: str) -> int:
    """How many ways the installed layout splits the logical dim ``name`` (1 without one): a model pads a
    dim it wants split to a multiple of it."""
    layout = _LAYOUT.get()
    return 1 if layout is None else max(1, int(layout.shards(name)))
