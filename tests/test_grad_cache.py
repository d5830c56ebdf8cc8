"""GradCache gives the loss and gradients of the plain step on the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_pairs  # noqa: E402

from mmret.data.processor import Processor, ProcessorConfig
from mmret.grad_cache import grad_cache_value_and_grad
from mmret.losses import info_nce
from mmret.models import qwen2_vl
from mmret.models.encoder import Encoder, EncoderConfig
from mmret.models.qwen2_vl.presets import hf_config

CHUNK, N_CHUNKS, LENGTH, PATCHES = 2, 3, 64, 2 * 64


@pytest.fixture(scope="module")
def setup(processor_dir):
    proc = Processor(processor_dir, ProcessorConfig(max_pixels=16 * 28 * 28, template="plain"))
    queries, cands = random_pairs(proc, CHUNK * N_CHUNKS)
    cfg = qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_config("tiny"))
    encoder = Encoder(qwen2_vl.create(cfg, seed=1), EncoderConfig())
    return proc, queries, cands, encoder


def collate(proc, examples, n_chunks):
    per = len(examples) // n_chunks
    chunks = [
        proc.collate(examples[i * per : (i + 1) * per], max_length=LENGTH, max_patches=PATCHES * per // CHUNK)
        for i in range(n_chunks)
    ]
    return jax.tree.map(lambda *xs: np.stack(xs), *chunks)


def test_grad_cache_equals_the_plain_step(setup):
    proc, queries, cands, encoder = setup
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)

    def embed(p, chunk):
        return nnx.merge(graphdef, p, rest)(chunk)

    def loss_fn(q, c, log_tau):
        b = q.shape[0]
        return info_nce(q, c, positive_index=jnp.arange(b), temperature=jnp.exp(log_tau))

    log_tau = jnp.log(jnp.float32(0.05))
    # Plain: the whole batch in one piece.
    full_q, full_c = collate(proc, queries, 1), collate(proc, cands, 1)

    def plain(p, log_tau):
        q = embed(p, jax.tree.map(lambda x: x[0], full_q))
        c = embed(p, jax.tree.map(lambda x: x[0], full_c))
        return loss_fn(q, c, log_tau)

    (loss, _), (g_params, g_tau) = jax.jit(jax.value_and_grad(plain, argnums=(0, 1), has_aux=True))(params, log_tau)
    # GradCache over 3 chunks of 2.
    qc, cc = collate(proc, queries, N_CHUNKS), collate(proc, cands, N_CHUNKS)
    run = jax.jit(lambda p, t: grad_cache_value_and_grad(embed, loss_fn, p, qc, cc, t))
    (loss_gc, _), (g_gc, g_tau_gc) = run(params, log_tau)

    assert float(loss) > 0.1
    np.testing.assert_allclose(float(loss_gc), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(g_tau_gc), float(g_tau), rtol=1e-4, atol=1e-6)
    flat, flat_gc = jax.tree.leaves(g_params), jax.tree.leaves(g_gc)
    assert len(flat) == len(flat_gc) > 10
    scale = max(float(jnp.abs(g).max()) for g in flat)
    assert scale > 0
    for g, h in zip(flat, flat_gc, strict=True):
        np.testing.assert_allclose(np.asarray(h), np.asarray(g), atol=1e-5 * scale, rtol=1e-3)
