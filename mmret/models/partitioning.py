"""Logical axis names carried by every parameter.

Model code names axes logically ("embed", "mlp", ...); the sharding module maps those names to
mesh axes with a rules table from the config (maxtext style). Model code never names a mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
