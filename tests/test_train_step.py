"""The train step: sharded over (data=2, fsdp=2, tensor=2) equals one device; GradCache equals plain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import random_pairs  # noqa: E402

from mmret import sharding
from mmret.data.processor import Processor, ProcessorConfig
from mmret.losses import Temperature
from mmret.models import qwen2_vl
from mmret.models.encoder import Encoder, EncoderConfig
from mmret.models.qwen2_vl.presets import hf_config
from mmret.models.retriever import Retriever
from mmret.tasks.base import init_state, split_model
from mmret.tasks.bi_encoder.step import StepConfig, make_train_step

B, LENGTH, PATCHES = 4, 64, 4 * 64


@pytest.fixture(scope="module")
def examples(processor_dir):
    proc = Processor(processor_dir, ProcessorConfig(max_pixels=16 * 28 * 28, template="plain"))
    return (proc, *random_pairs(proc, B))


def retriever(seed: int = 1) -> Retriever:
    cfg = qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_config("tiny"))
    return Retriever(Encoder(qwen2_vl.create(cfg, seed=seed), EncoderConfig()), Temperature(0.05))


def batch_of(proc, queries, cands, chunks: int = 1):
    def collate(exs):
        per = len(exs) // chunks
        parts = [
            proc.collate(
                exs[i * per : (i + 1) * per], max_length=LENGTH, max_patches=PATCHES // chunks, max_images=2 * per
            )
            for i in range(chunks)
        ]
        return parts[0] if chunks == 1 else jax.tree.map(lambda *xs: np.stack(xs), *parts)

    return {"query": collate(queries), "candidates": collate(cands), "positive_mask": np.eye(B, dtype=bool)}


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_sharded_step_equals_single_device(examples):
    proc, queries, cands = examples
    batch = batch_of(proc, queries, cands)
    tx = optax.sgd(0.5)  # AdamW would amplify float noise in near-zero gradients (see sharding tests)
    graphdef, params, rest = split_model(retriever())
    step = make_train_step(graphdef, tx)

    ref_state, ref_metrics = jax.jit(step)(init_state(params, rest, tx), batch)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = sharding.place_model(retriever(), mesh)
    graphdef, params, rest = split_model(model)
    for x in jax.tree.leaves(params):  # really distributed, not all replicated
        assert isinstance(x.sharding, jax.sharding.NamedSharding)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
    state = init_state(params, rest, tx)
    sharded_batch = sharding.put_batch(batch, mesh)
    new_state, metrics = jax.jit(step)(state, sharded_batch)

    assert float(ref_metrics["loss"]) > 0.1
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    moved = 0
    for a, b, before in zip(leaves(new_state.params), leaves(ref_state.params), leaves(params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        moved += int(np.abs(b - before).max() > 1e-6)
    assert moved > 10  # the step really changed the parameters


def test_grad_cache_step_equals_plain_step(examples):
    proc, queries, cands = examples
    tx = optax.sgd(0.5)
    graphdef, params, rest = split_model(retriever())
    state = init_state(params, rest, tx)
    plain, plain_m = jax.jit(make_train_step(graphdef, tx))(state, batch_of(proc, queries, cands))
    chunked = batch_of(proc, queries, cands, chunks=2)
    gc, gc_m = jax.jit(make_train_step(graphdef, tx, StepConfig(grad_cache=True)))(state, chunked)
    np.testing.assert_allclose(float(gc_m["loss"]), float(plain_m["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(gc_m["grad_norm"]), float(plain_m["grad_norm"]), rtol=1e-4)
    for a, b in zip(leaves(gc.params), leaves(plain.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert int(gc.step) == 1


def test_frozen_parameters_do_not_move(examples):
    proc, queries, cands = examples
    tx = optax.sgd(0.5)
    model = retriever()
    frozen = nnx.All(nnx.Param, nnx.PathContains("visual"))
    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, nnx.Not(frozen)), ...)
    state, _ = jax.jit(make_train_step(graphdef, tx))(init_state(params, rest, tx), batch_of(proc, queries, cands))
    vision_before = leaves(nnx.state(model.encoder.backbone.visual))
    after = nnx.merge(graphdef, state.params, state.rest)
    for a, b in zip(leaves(nnx.state(after.encoder.backbone.visual)), vision_before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(
        np.asarray(after.encoder.backbone.language_model.norm.scale[...]),
        np.asarray(model.encoder.backbone.language_model.norm.scale[...]),
    )
    assert jnp.isfinite(after.temperature())


def test_mined_negatives_join_the_global_candidate_set_with_grad_cache_on_a_mesh(processor_dir):
    """Each query's positive and its 2 mined negatives, chunked for GradCache, sharded over 2 devices: the loss
    is InfoNCE of every query against all 3 * 4 candidates of the global batch (numpy, from
    one-device embeddings), not against the 3 that sit on its own device."""
    n = B  # queries: 2 chunks of 2, one query and its 3 candidates per batch shard of each chunk
    from mmret.tasks.bi_encoder.task import BiEncoder

    proc = Processor(processor_dir, ProcessorConfig(max_pixels=16 * 28 * 28, template="plain"))
    queries, cands = random_pairs(proc, 3 * n, seed=3)
    queries = queries[:n]  # query b's candidates: 3b (its positive), 3b + 1, 3b + 2 (its mined negatives)
    mask = np.zeros((n, 3 * n), bool)
    mask[np.arange(n), 3 * np.arange(n)] = True

    def collate(exs, chunks):
        per = len(exs) // chunks
        parts = [
            proc.collate(exs[i * per : (i + 1) * per], max_length=LENGTH, max_patches=3 * PATCHES, max_images=2 * per)
            for i in range(chunks)
        ]
        return parts[0] if chunks == 1 else jax.tree.map(lambda *xs: np.stack(xs), *parts)

    def info_nce(logits, target):
        logits = logits - logits.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(target)), target]))

    model = retriever(seed=2)
    q = np.asarray(model.encoder(collate(queries, 1)), np.float64)
    c = np.asarray(model.encoder(collate(cands, 1)), np.float64)
    logits = q @ c.T / 0.05
    expected = info_nce(logits, 3 * np.arange(n))
    per_device = info_nce(np.stack([logits[b, 3 * b : 3 * b + 3] for b in range(n)]), np.zeros(n, int))

    mesh = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])  # 2 batch shards
    rules = sharding.make_rules()
    graphdef, params, rest = split_model(sharding.place_model(retriever(seed=2), mesh))
    state = init_state(params, rest, optax.sgd(0.1))
    host = {"query": collate(queries, 2), "candidates": collate(cands, 2), "positive_mask": mask}  # 2 chunks
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        batch = BiEncoder().global_arrays(host, mesh, rules)  # the trainer's placement of a host batch
        step = make_train_step(graphdef, optax.sgd(0.1), StepConfig(grad_cache=True))
        _, metrics = jax.jit(step)(state, {**batch, "positive_mask": batch["positive_mask"].reshape(n, -1)})
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert abs(expected - per_device) > 1e-2  # the test tells the global candidate set from a per-device one
