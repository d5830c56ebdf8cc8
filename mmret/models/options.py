"""Run options every backbone accepts: how (not what) a model computes, and the dtypes it computes in."""

from __future__ import annotations

from typing import Any, Literal

import jax.numpy as jnp

AttentionImpl = Literal["xla", "cudnn", "auto"]
AttentionMode = Literal["causal", "bidirectional"]
RematPolicy = Literal["none", "full", "dots", "dots_with_no_batch_dims"]

#: dtype names a config may give, and the jnp dtypes they mean.
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: Any) -> Any:
    """Accept a jnp dtype or its name."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype
