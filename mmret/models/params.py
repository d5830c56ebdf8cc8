"""A model's parameters as a flat dict of path -> array (any backbone)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

ParamPath = tuple[str | int, ...]


def flat_params(model: Any) -> dict[ParamPath, jax.Array]:
    """Our parameters as a flat dict of path -> array."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def count_params(model: Any) -> int:
    """Number of parameter values."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
