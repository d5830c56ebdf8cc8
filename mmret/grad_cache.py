"""GradCache: a contrastive step over a global batch larger than memory allows at once.

1. Embed every chunk of queries and candidates with no activations kept (``stop_gradient``).
2. Take the loss over the whole batch of embeddings and its gradient with respect to them.
3. Re-embed chunk by chunk, each time back-propagating that chunk's slice of the embedding
   gradient into the parameters (a VJP), and sum.

The result equals the plain step (every negative reaches every query) while peak memory holds one
chunk's activations plus the [batch, dim] embeddings. Chunks are the leading axis of the batch
arrays (``mmret.data.pipeline`` collates them so when ``grad_cache_chunk`` is set).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Params = Any
Chunks = Any  # a pytree of arrays with a leading [num_chunks] axis
EmbedFn = Callable[[Params, Any], jax.Array]  # (params, one chunk) -> [chunk_size, dim]
LossFn = Callable[..., tuple[jax.Array, Any]]  # (queries, candidates, extra) -> (loss, aux)


def embed_chunks(embed: EmbedFn, params: Params, chunks: Chunks) -> jax.Array:
    """[num_chunks * chunk_size, dim] embeddings, computed one chunk at a time, no gradient."""
    out = jax.lax.map(lambda chunk: embed(jax.lax.stop_gradient(params), chunk), chunks)
    return jax.lax.stop_gradient(out.reshape(-1, out.shape[-1]))


def backprop_chunks(embed: EmbedFn, params: Params, chunks: Chunks, grad_embeddings: jax.Array, init: Params) -> Params:
    """``init`` + sum over chunks of d(embeddings_chunk)/d(params)^T @ grad_chunk."""
    n = jax.tree.leaves(chunks)[0].shape[0]
    grad_embeddings = grad_embeddings.reshape(n, -1, grad_embeddings.shape[-1])

    def step(acc: Params, xs: tuple[Any, jax.Array]) -> tuple[Params, None]:
        chunk, g = xs
        _, vjp = jax.vjp(lambda p: embed(p, chunk), params)
        (grad,) = vjp(g.astype(jnp.float32))
        return jax.tree.map(jnp.add, acc, grad), None

    acc, _ = jax.lax.scan(step, init, (chunks, grad_embeddings))
    return acc


def grad_cache_value_and_grad(
    embed: EmbedFn,
    loss_fn: LossFn,
    params: Params,
    query_chunks: Chunks,
    candidate_chunks: Chunks,
    extra: Any,
) -> tuple[tuple[jax.Array, Any], tuple[Params, Any]]:
    """``((loss, aux), (d loss / d params, d loss / d extra))`` as ``jax.value_and_grad`` of
    ``loss_fn(embed(params, all queries), embed(params, all candidates), extra)`` would give.

    ``extra`` holds the parameters the loss itself owns (e.g. the temperature).
    """
    queries = embed_chunks(embed, params, query_chunks)
    candidates = embed_chunks(embed, params, candidate_chunks)
    (loss, aux), (g_queries, g_candidates, g_extra) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
        queries, candidates, extra
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    grads = backprop_chunks(embed, params, query_chunks, g_queries, zeros)
    grads = backprop_chunks(embed, params, candidate_chunks, g_candidates, grads)
    return (loss, aux), (grads, g_extra)
