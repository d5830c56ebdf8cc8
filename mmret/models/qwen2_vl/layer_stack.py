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

    def __call__(
        self, x: jax.Array, *args: Any, per_layer: Any = None, start: int = 0, stop: int | None = None
    ) -> jax.Array:
        """Apply blocks ``start`` to ``stop`` (default: all) in order, each as ``block(x, *args)``.
        ``per_layer`` (an array [stop - start]): block i also gets ``per_layer[i - start]`` as a last argument,
        a traced scalar under ``scan``, else a numpy scalar (a block can branch on it in Python)."""
        stop = self.num if stop is None else stop
        if not 0 <= start <= stop <= self.num:
            raise ValueError(f"blocks {start}:{stop} of a stack of {self.num}")

        def apply(graphdef: Any, state: Any, h: jax.Array, *extra: Any) -> jax.Array:
            return nnx.merge(graphdef, state)(h, *args, *extra)

        if per_layer is not None and len(per_layer) != stop - start:
            raise ValueError(f"per_layer has {len(per_layer)} entries for {stop - start} blocks")
        if start == stop:
            return x
        if self.scan:
            graphdef, state = nnx.split(self.layers)
            if (start, stop) != (0, self.num):
                state = jax.tree.map(lambda a: a[start:stop], state)
            if per_layer is None:
                step = _remat(lambda h, s: (apply(graphdef, s, h), None), self.remat)
                x, _ = jax.lax.scan(step, x, state)
            else:
                step = _remat(lambda h, sf: (apply(graphdef, sf[0], h, sf[1]), None), self.remat)
                x, _ = jax.lax.scan(step, x, (state, jax.numpy.asarray(per_layer)))
            return x
        for i in range(start, stop):
            graphdef, state = nnx.split(self.layers[i])
            extra = () if per_layer is None else (per_layer[i - start],)
            x = _remat(lambda s, h, g=graphdef, e=extra: apply(g, s, h, *e), self.remat)(state, x)
        return x

    def block(self, i: int) -> nnx.Module:
        """Block ``i`` as a module of its own (its slice of the stacked parameters under ``scan``)."""
        if not self.scan:
            return self.layers[i]
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
