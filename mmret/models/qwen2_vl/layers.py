"""Small building blocks shared by the vision tower and the decoder: linear, norms, activations."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mmret.models.partitioning import logical

INIT_STD = 0.02


def linear(
    din: int, dout: int, axes: tuple[str, str], *, bias: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
) -> nnx.Linear:
    """A dense layer whose kernel [din, dout] and bias [dout] carry logical axis names."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(nnx.initializers.normal(INIT_STD), *axes),
        bias_init=logical(nnx.initializers.zeros_init(), axes[1]),
        rngs=rngs,
    )


def layer_norm(dim: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=logical(nnx.initializers.ones_init(), "norm"),
        bias_init=logical(nnx.initializers.zeros_init(), "norm"),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Qwen2's RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(logical(nnx.initializers.ones_init(), "norm")(None, (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


def activation(name: str):
    """The activations Qwen2-VL configs name."""
    table = {
        "silu": jax.nn.silu,
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(table)}")
    return table[name]
