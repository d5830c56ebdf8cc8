"""A stack of identical blocks, applied with ``jax.lax.scan`` (stacked parameters) or a Python loop,
with an optional rematerialisation policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from mmret.models.options import RematPolicy

_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _remat(fn: Callable, policy: RematPolicy) -> Callable:
    if policy == "none":
        return fn
    if policy not in _POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose none or one of {sorted(_POLICIES)}")
    return jax.checkpoint(fn, policy=_POLICIES[policy], prevent_cse=False)


class LayerStack(nnx.Module):
    """``num`` blocks made by ``make(rngs)``. With ``scan`` their parameters are stacked along a
    leading axis named "layers" and applied with one scanned block (one compile, any depth)."""

    def __init__(
        self,
        make: Callable[[nnx.Rngs], nnx.Module],
        num: int,
        *,
        scan: bool,
        remat: RematPolicy,
        rngs: nnx.Rngs,
    ):
        self.num = num
        self.scan = scan
        self.remat = remat
        if scan:

            @nnx.split_rngs(splits=num)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(r: nnx.Rngs) -> nnx.Module:
                return make(r)

            self.layers = create(rngs)
        else:
            self.layers = nnx.List([make(rngs) for _ in range(num)])

    def __call__(self, x: jax.Array, *args: Any) -> jax.Array:
        def apply(graphdef: Any, state: Any, h: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state)(h, *args)

        if self.scan:
            graphdef, state = nnx.split(self.layers)
            step = _remat(lambda h, s: (apply(graphdef, s, h), None), self.remat)
            x, _ = jax.lax.scan(step, x, state)
            return x
        for layer in self.layers:
            graphdef, state = nnx.split(layer)
            x = _remat(lambda s, h, g=graphdef: apply(g, s, h), self.remat)(state, x)
        return x
