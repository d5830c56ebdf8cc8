"""Losses against a plain numpy reference (float64, a loop over queries, explicit masks)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmret.losses import (
    FixedTemperature,
    Temperature,
    bounded_temperature,
    info_nce,
    listwise_distillation,
    same_did_mask,
    teacher_scores,
)

# --------------------------------------------------------------------------------------------------
# numpy reference


def _lse(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def ref_info_nce(q, c, pos_idx, pos_mask=None, same_did=None, tau=0.05, symmetric=False):
    """Loss, accuracy: the definition written out pair by pair."""
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    b, n = len(q), len(c)
    s = q @ c.T / tau

    def excluded(i: int, j: int) -> bool:  # the pair (query i, candidate j) is not a negative
        return (
            j == pos_idx[i]
            or (pos_mask is not None and bool(pos_mask[i, j]))
            or (same_did is not None and bool(same_did[i, j]))
        )

    q2c, correct = [], []
    for i in range(b):
        t = pos_idx[i]
        den = [j for j in range(n) if j == t or not excluded(i, j)]
        q2c.append(_lse(s[i, den]) - s[i, t])
        correct.append(all(s[i, t] > s[i, j] for j in den if j != t))
    loss = float(np.mean(q2c))
    if symmetric:
        c2q = []
        for i in range(b):
            t = pos_idx[i]
            den = [k for k in range(b) if k == i or not excluded(k, t)]
            c2q.append(_lse(s[den, t]) - s[i, t])
        loss = 0.5 * (loss + float(np.mean(c2q)))
    return loss, float(np.mean(correct))


def ref_kl(student, teacher, tau, mask=None):
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    mask = np.ones(student.shape, bool) if mask is None else np.asarray(mask)
    kls = []
    for s, t, m in zip(student, teacher, mask, strict=True):
        if not m.any():
            continue
        ls = s[m] / tau - _lse(s[m] / tau)
        lt = t[m] / tau - _lse(t[m] / tau)
        kls.append(np.sum(np.exp(lt) * (lt - ls)))
    return float(np.mean(kls))


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def batch(rng: np.random.Generator, b: int = 6, k: int = 2, d: int = 16):
    """Pipeline layout: C = B * (1 + k), query i's positive at i * (1 + k), near its query (losses of order 1)."""
    q = unit(rng, b, d)
    c = unit(rng, b * (1 + k), d)
    pos_idx = np.arange(b) * (1 + k)
    c[pos_idx] = q + 2.0 * c[pos_idx]
    c /= np.linalg.norm(c, axis=-1, keepdims=True)
    return q, c, pos_idx


_info_nce = jax.jit(info_nce, static_argnames=("symmetric", "normalize"))


def check(q, c, pos_idx, pos_mask=None, same_did=None, tau=0.05, symmetric=False, atol=1e-5):
    loss, m = _info_nce(
        jnp.asarray(q),
        jnp.asarray(c),
        positive_index=jnp.asarray(pos_idx),
        positive_mask=jnp.zeros((len(q), len(c)), bool) if pos_mask is None else jnp.asarray(pos_mask),
        same_did=jnp.zeros((len(q), len(c)), bool) if same_did is None else jnp.asarray(same_did),
        temperature=tau,
        symmetric=symmetric,
    )
    ref_loss, ref_acc = ref_info_nce(
        np.asarray(q, np.float64), np.asarray(c, np.float64), pos_idx, pos_mask, same_did, tau, symmetric
    )
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(float(m["accuracy"]), ref_acc)
    assert float(m["loss"]) == float(loss)
    return float(loss), m


# --------------------------------------------------------------------------------------------------
# InfoNCE


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_info_nce_matches_reference_random(symmetric, tau):
    rng = np.random.default_rng(0)
    q, c, pos_idx = batch(rng)
    loss, m = check(q, c, pos_idx, tau=tau, symmetric=symmetric)
    np.testing.assert_allclose(float(m["temperature"]), tau, rtol=1e-6)
    np.testing.assert_allclose(float(m["pos_score"]), np.mean(np.sum(q * c[pos_idx], -1)), rtol=1e-5)
    neg = np.ones((len(q), len(c)), bool)
    neg[np.arange(len(q)), pos_idx] = False
    np.testing.assert_allclose(float(m["neg_score"]), (q @ c.T)[neg].mean(), rtol=1e-4, atol=1e-6)
    # Random targets (no pipeline layout) and random masks too.
    pos_idx = rng.integers(len(c), size=len(q))
    pos_mask = rng.random((len(q), len(c))) < 0.3
    same = rng.random((len(q), len(c))) < 0.2
    check(q, c, pos_idx, pos_mask, same, tau=tau, symmetric=symmetric)


def test_labelled_second_positive_in_batch_is_not_a_negative():
    rng = np.random.default_rng(1)
    q, c, pos_idx = batch(rng, b=4, k=1)
    # Query 0's labelled positives: its own (candidate 0) and query 1's (candidate 2).
    pos_mask = np.zeros((4, 8), bool)
    pos_mask[np.arange(4), pos_idx] = True
    pos_mask[0, 2] = True
    c[2] = q[0]  # a perfect match for query 0: as a negative it would dominate the denominator
    masked, m = check(q, c, pos_idx, pos_mask)
    unmasked, _ = check(q, c, pos_idx)
    assert masked < unmasked
    # Query 0's term equals its loss on the batch without candidate 2.
    keep = [j for j in range(8) if j != 2]
    loss0, _ = _info_nce(jnp.asarray(q[:1]), jnp.asarray(c[keep]), positive_index=jnp.array([0]), temperature=0.05)
    s = q @ c.T / 0.05
    per_query = [
        _lse(s[i, [j for j in range(8) if j == pos_idx[i] or not pos_mask[i, j]]]) - s[i, pos_idx[i]] for i in range(4)
    ]
    np.testing.assert_allclose(float(loss0), per_query[0], rtol=1e-5)
    # And the accuracy ignores it: candidate 2 beats the target, but it is not a competitor.
    assert float(m["accuracy"]) >= 0.25


def test_duplicate_dids_across_queries():
    rng = np.random.default_rng(2)
    q, c, pos_idx = batch(rng, b=4, k=1)
    # Queries 1 and 3 sampled the same positive did; query 0's hard negative is query 2's positive.
    dids = ["a", "n0", "x", "n1", "b", "n2", "x", "n3"]
    dids[1] = "b"
    c[6] = c[2]
    c[1] = c[4]
    same = same_did_mask(dids, pos_idx)
    expected = np.zeros((4, 8), bool)
    expected[0, 0] = True
    expected[[1, 1, 3, 3], [2, 6, 2, 6]] = True
    expected[[2, 2], [1, 4]] = True
    np.testing.assert_array_equal(same, expected)
    for symmetric in (False, True):
        with_mask, _ = check(q, c, pos_idx, same_did=same, symmetric=symmetric)
        without, _ = check(q, c, pos_idx, symmetric=symmetric)
        assert with_mask < without
    # Query 1's duplicate target (candidate 6) is out of its denominator; its loss is that of a batch
    # without candidate 6.
    s = q @ c.T / 0.05
    keep = [j for j in range(8) if j != 6]
    loss1, _ = _info_nce(jnp.asarray(q[1:2]), jnp.asarray(c[keep]), positive_index=jnp.array([2]), temperature=0.05)
    np.testing.assert_allclose(float(loss1), _lse(s[1, keep]) - s[1, 2], rtol=1e-5)


def test_symmetric_masks_shared_targets_in_both_directions():
    rng = np.random.default_rng(3)
    q, c, _ = batch(rng, b=4, k=1)
    # Queries 0 and 1 share one target index; query 2's target is a labelled positive of query 3 too.
    pos_idx = np.array([0, 0, 4, 6])
    pos_mask = np.zeros((4, 8), bool)
    pos_mask[np.arange(4), pos_idx] = True
    pos_mask[3, 4] = True
    sym, m = check(q, c, pos_idx, pos_mask, symmetric=True)
    plain, _ = check(q, c, pos_idx, pos_mask, symmetric=False)
    assert sym != plain
    np.testing.assert_allclose(0.5 * (float(m["loss_q2c"]) + float(m["loss_c2q"])), sym, rtol=1e-6)
    np.testing.assert_allclose(float(m["loss_q2c"]), plain, rtol=1e-6)
    # Candidate -> query: for target 0, the other query with target 0 is no negative; for target 4,
    # query 3 (which labels it) is none either.
    s = q @ c.T / 0.05
    np.testing.assert_allclose(
        float(m["loss_c2q"]) * 4,
        sum(
            _lse(s[den, pos_idx[i]]) - s[i, pos_idx[i]]
            for i, den in enumerate([[0, 2, 3], [1, 2, 3], [0, 1, 2], [0, 1, 2, 3]])
        ),
        rtol=1e-5,
    )


def test_bfloat16_inputs_computed_in_float32():
    rng = np.random.default_rng(4)
    q, c, pos_idx = batch(rng, b=8, k=3, d=64)
    qb, cb = q.astype(ml_dtypes.bfloat16), c.astype(ml_dtypes.bfloat16)
    for symmetric in (False, True):
        loss, m = _info_nce(
            jnp.asarray(qb), jnp.asarray(cb), positive_index=jnp.asarray(pos_idx), temperature=0.05, symmetric=symmetric
        )
        assert loss.dtype == jnp.float32 and m["pos_score"].dtype == jnp.float32
        ref, _ = ref_info_nce(qb.astype(np.float64), cb.astype(np.float64), pos_idx, tau=0.05, symmetric=symmetric)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_normalize_option():
    rng = np.random.default_rng(5)
    q, c, pos_idx = batch(rng)
    scale_q, scale_c = rng.uniform(0.5, 3, (len(q), 1)), rng.uniform(0.5, 3, (len(c), 1))
    loss, _ = _info_nce(
        jnp.asarray(q * scale_q, jnp.float32),
        jnp.asarray(c * scale_c, jnp.float32),
        positive_index=jnp.asarray(pos_idx),
        temperature=0.05,
        normalize=True,
    )
    np.testing.assert_allclose(float(loss), ref_info_nce(q, c, pos_idx)[0], rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Temperature


def test_temperature_init_and_bounds():
    t = Temperature(0.05)
    np.testing.assert_allclose(float(t()), 0.05, rtol=1e-6)
    assert isinstance(t.log_tau, nnx.Param)
    t.log_tau[...] = jnp.float32(math.log(1e-4))
    np.testing.assert_allclose(float(t()), 0.01, rtol=1e-6)
    t.log_tau[...] = jnp.float32(math.log(30.0))
    np.testing.assert_allclose(float(t()), 1.0, rtol=1e-6)
    fixed = Temperature(0.05, learnable=False, min_temperature=0.02, max_temperature=0.5)
    assert isinstance(fixed.log_tau, FixedTemperature) and not isinstance(fixed.log_tau, nnx.Param)
    fixed.log_tau[...] = jnp.float32(0.0)
    np.testing.assert_allclose(float(fixed()), 0.5, rtol=1e-6)
    for bad in (0.005, 2.0):
        with pytest.raises(ValueError, match="temperature"):
            Temperature(bad)


def test_bounded_temperature_gradient_outside_bounds_only_points_inward():
    lo = math.log(0.01)
    below = jnp.float32(lo - 1.0)
    grad = jax.grad(lambda x, s: s * bounded_temperature(x))
    assert float(grad(below, 1.0)) == 0.0  # descent would push it further down: blocked
    np.testing.assert_allclose(float(grad(below, -1.0)), -0.01, rtol=1e-5)  # back up: passed
    above = jnp.float32(1.0)
    assert float(grad(above, -1.0)) == 0.0
    np.testing.assert_allclose(float(grad(above, 1.0)), 1.0, rtol=1e-5)
    inside = jnp.float32(math.log(0.05))
    np.testing.assert_allclose(float(grad(inside, 1.0)), 0.05, rtol=1e-5)
    assert float(jax.grad(lambda x: bounded_temperature(x, learnable=False))(inside)) == 0.0


class _Head(nnx.Module):
    """A toy embedder (a linear map) plus the temperature, as a train step would hold them."""

    def __init__(self, d: int, *, learnable: bool):
        self.proj = nnx.Linear(d, d, use_bias=False, rngs=nnx.Rngs(0))
        self.temperature = Temperature(0.05, learnable=learnable)

    def __call__(self, q, c, pos_idx):
        return info_nce(
            self.proj(q), self.proj(c), positive_index=pos_idx, temperature=self.temperature(), normalize=True
        )


@nnx.jit(static_argnames="wrt")
def _loss_and_grads(model: _Head, q, c, pos_idx, wrt=nnx.Param):
    """What a train step differentiates: the loss w.r.t. the model's ``wrt`` variables."""
    loss_fn = lambda m: m(q, c, pos_idx)
    return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)


def test_log_tau_gradient_matches_finite_differences():
    rng = np.random.default_rng(6)
    q, c, pos_idx = batch(rng)
    model = _Head(q.shape[1], learnable=True)
    (loss, _), grads = _loss_and_grads(model, q, c, pos_idx)
    g = float(grads["temperature"]["log_tau"][...])
    # Reference: central differences of the float64 loss on the model's own embeddings.
    emb_q, emb_c = np.asarray(model.proj(q), np.float64), np.asarray(model.proj(c), np.float64)
    emb_q /= np.linalg.norm(emb_q, axis=-1, keepdims=True)
    emb_c /= np.linalg.norm(emb_c, axis=-1, keepdims=True)
    f = lambda log_tau: ref_info_nce(emb_q, emb_c, pos_idx, tau=math.exp(log_tau))[0]
    eps, x = 1e-5, math.log(0.05)
    fd = (f(x + eps) - f(x - eps)) / (2 * eps)
    np.testing.assert_allclose(float(loss), f(x), rtol=1e-5)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-6)
    assert abs(g) > 1e-3


def test_fixed_temperature_gets_no_gradient_and_no_update():
    rng = np.random.default_rng(7)
    q, c, pos_idx = batch(rng)
    model = _Head(q.shape[1], learnable=False)
    _, grads = _loss_and_grads(model, q, c, pos_idx)
    assert "temperature" not in grads  # not a Param
    _, everything = _loss_and_grads(model, q, c, pos_idx, wrt=nnx.Variable)
    assert float(everything["temperature"]["log_tau"][...]) == 0.0  # stopped even when asked for
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    before = float(model.temperature.log_tau[...]), np.asarray(model.proj.kernel[...]).copy()
    optimizer.update(model, grads)
    assert float(model.temperature.log_tau[...]) == before[0]
    assert not np.array_equal(np.asarray(model.proj.kernel[...]), before[1])
    # The learnable one moves.
    model = _Head(q.shape[1], learnable=True)
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    optimizer.update(model, _loss_and_grads(model, q, c, pos_idx)[1])
    assert float(model.temperature.log_tau[...]) != math.log(0.05)


# --------------------------------------------------------------------------------------------------
# Distillation


_kl = jax.jit(listwise_distillation, static_argnames=("teacher_scale", "eps"))


def test_listwise_distillation_matches_numpy_kl():
    rng = np.random.default_rng(8)
    student = rng.uniform(-1, 1, (5, 50)).astype(np.float32)
    teacher = teacher_scores(jnp.asarray(rng.uniform(-1, 1, (5, 50))), jnp.asarray(rng.uniform(0, 1, (5, 50))), w=0.7)
    for tau in (0.02, 0.1, 1.0):
        loss = _kl(jnp.asarray(student), teacher, tau=tau)
        np.testing.assert_allclose(float(loss), ref_kl(student, np.asarray(teacher), tau), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(_kl(teacher, teacher, tau=0.05)), 0.0, atol=1e-6)


def umarvel_distill_loss(cos: np.ndarray, fused: np.ndarray, tau: float, tau_teacher: float) -> float:
    """U-MARVEL's stage-5 loss as its code computes it (``models/qwen2_vl_finetune_with_distillrerank.py``
    with ``compute_kl_divergence``), restated in numpy: the fused scores halved, both divided by the
    temperature (the teacher's detached), softmaxes, then ``F.kl_div(log(q + 1e-8), p, "batchmean")``."""

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p = softmax(np.asarray(fused, np.float64) / 2 / tau_teacher)
    q = softmax(np.asarray(cos, np.float64) / tau)
    return float(np.sum(p * (np.log(p) - np.log(q + 1e-8))) / len(p))


def test_distillation_equals_umarvels_loss_with_the_halving_and_a_detached_teacher_temperature():
    rng = np.random.default_rng(11)
    cos = rng.uniform(-0.3, 0.9, (3, 50)).astype(np.float32)
    fused = (rng.uniform(-0.3, 0.9, (3, 50)) + rng.uniform(0, 1, (3, 50))).astype(np.float32)
    for tau in (0.02, 0.05, 0.3):
        loss = _kl(jnp.asarray(cos), jnp.asarray(fused), tau=tau, teacher_scale=0.5, eps=1e-8)
        np.testing.assert_allclose(float(loss), umarvel_distill_loss(cos, fused, tau, tau), rtol=2e-4, atol=2e-6)
        exact = _kl(jnp.asarray(cos), jnp.asarray(fused), tau=tau, teacher_scale=0.5)
        np.testing.assert_allclose(float(exact), ref_kl(cos, 0.5 * fused, tau), rtol=1e-4)
    # d loss / d tau flows through the student side only: the reference's derivative with its teacher fixed.
    tau, h = 0.05, 1e-4
    g = jax.grad(
        lambda t: listwise_distillation(jnp.asarray(cos), jnp.asarray(fused), tau=t, teacher_scale=0.5, eps=1e-8)
    )(jnp.float32(tau))
    numeric = (umarvel_distill_loss(cos, fused, tau + h, tau) - umarvel_distill_loss(cos, fused, tau - h, tau)) / (
        2 * h
    )
    np.testing.assert_allclose(float(g), numeric, rtol=2e-3)
    both = (umarvel_distill_loss(cos, fused, tau + h, tau + h) - umarvel_distill_loss(cos, fused, tau - h, tau - h)) / (
        2 * h
    )
    assert abs(float(g) - both) > 10 * abs(float(g) - numeric)  # a gradient through the teacher would differ


def test_teacher_scores_is_cosine_plus_weighted_p_yes():
    cos, p = jnp.array([[0.2, 0.5]]), jnp.array([[0.9, 0.1]])
    np.testing.assert_allclose(np.asarray(teacher_scores(cos, p)), [[1.1, 0.6]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(teacher_scores(cos, p, w=0.5)), [[0.65, 0.55]], rtol=1e-6)


def test_listwise_distillation_masked_entries_change_nothing():
    rng = np.random.default_rng(9)
    student = rng.uniform(-1, 1, (4, 10)).astype(np.float32)
    teacher = rng.uniform(-1, 1, (4, 10)).astype(np.float32)
    mask = np.ones((4, 10), bool)
    mask[0, 7:] = False
    mask[2, :3] = False
    mask[3] = False  # an all-padding query: left out of the mean
    loss = _kl(jnp.asarray(student), jnp.asarray(teacher), tau=0.05, mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), ref_kl(student, teacher, 0.05, mask), rtol=1e-5)
    junk_s, junk_t = student.copy(), teacher.copy()
    junk_s[~mask] = 1e4
    junk_t[~mask] = -3e3
    loss_junk = _kl(jnp.asarray(junk_s), jnp.asarray(junk_t), tau=0.05, mask=jnp.asarray(mask))
    assert float(loss_junk) == float(loss)
    # Zero when student == teacher on the valid entries, whatever the padding holds.
    same = _kl(jnp.asarray(junk_s), jnp.asarray(np.where(mask, junk_s, 7.0)), tau=0.05, mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(same), 0.0, atol=1e-6)
    # Gradients: finite, none to padding, none to the teacher.
    gs, gt = jax.jit(jax.grad(listwise_distillation, argnums=(0, 1)))(
        jnp.asarray(junk_s), jnp.asarray(junk_t), tau=0.05, mask=jnp.asarray(mask)
    )
    assert np.isfinite(np.asarray(gs)).all()
    assert np.all(np.asarray(gs)[~mask] == 0) and np.all(np.asarray(gt) == 0)


# --------------------------------------------------------------------------------------------------
# jit + sharding


def test_sharded_global_batch_equals_unsharded():
    """Both directions (``loss_q2c`` is the plain loss) and the gradients, batch sharded 8 ways."""
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py simulates 8 CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    rng = np.random.default_rng(10)
    q, c, pos_idx = batch(rng, b=16, k=2, d=32)
    pos_mask = np.zeros((16, 48), bool)
    pos_mask[np.arange(16), pos_idx] = True
    pos_mask[0, pos_idx[9]] = True  # a labelled positive living on another device
    dids = [f"d{j}" for j in range(48)]
    dids[pos_idx[5]] = dids[pos_idx[12]] = dids[40] = "dup"
    same = same_did_mask(dids, pos_idx)

    def loss_and_grads(q, c, pos_idx, pos_mask, same, log_tau):
        f = lambda q, c, lt: info_nce(
            q,
            c,
            positive_index=pos_idx,
            positive_mask=pos_mask,
            same_did=same,
            temperature=bounded_temperature(lt),
            symmetric=True,
        )
        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, c, log_tau)

    args = (q, c, pos_idx, pos_mask, same, jnp.float32(math.log(0.05)))
    (loss, m), grads = jax.jit(loss_and_grads)(*args)
    rows, mat = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", None))
    sharded = [jax.device_put(x, s) for x, s in zip(args[:5], (mat, mat, rows, mat, mat), strict=True)] + [args[5]]
    assert len(sharded[0].sharding.device_set) == 8
    (loss_s, m_s), grads_s = jax.jit(loss_and_grads)(*sharded)
    np.testing.assert_allclose(float(loss_s), float(loss), atol=1e-6, rtol=0)
    for key in ("loss_q2c", "loss_c2q", "accuracy", "accuracy_c2q", "pos_score", "neg_score"):
        np.testing.assert_allclose(float(m_s[key]), float(m[key]), atol=1e-6, rtol=0, err_msg=key)
    for g, g_s in zip(grads, grads_s, strict=True):
        np.testing.assert_allclose(np.asarray(g_s), np.asarray(g), atol=1e-6, rtol=1e-5)
    for symmetric, value in ((True, loss), (False, m["loss_q2c"])):
        ref = ref_info_nce(q, c, pos_idx, pos_mask, same, 0.05, symmetric)[0]
        np.testing.assert_allclose(float(value), ref, rtol=1e-5)
