"""Retrieval losses: global-batch InfoNCE with false-negative masking, a bounded temperature, and
listwise distillation (U-MARVEL, RECIPES.md sections 3 and 4).

Everything here is a pure function of global arrays: call it inside ``jit`` on arrays sharded over
the batch and GSPMD inserts the gathers, so every query sees every candidate of the global batch
(positives and hard negatives from all devices) without a hand-written collective.

Batch layout (:func:`mmret.data.pipeline.collate_train`): ``B`` queries, ``C = B * (1 + k)``
candidates, query ``b``'s sampled positive at ``positive_index[b] = b * (1 + k)``; ``positive_mask``
[B, C] marks candidates that are labelled positives of a query (its own positive included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Metrics = dict[str, jax.Array]

#: Default temperature bounds. 0.01 keeps logits within +-100 (CLIP's logit-scale cap); 1.0 is the
#: plain cosine, beyond which InfoNCE over [-1, 1] scores stops separating anything.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 1.0


# --------------------------------------------------------------------------------------------------
# Temperature


class FixedTemperature(nnx.Variable):
    """A temperature that is not trained: not an ``nnx.Param``, so ``nnx.grad`` / ``nnx.Optimizer``
    (``wrt=nnx.Param``) leave it alone, and it keeps its own slot in checkpoints."""


@jax.custom_vjp
def _clip_inward(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    return jnp.clip(x, lo, hi)


def _clip_inward_fwd(x, lo, hi):
    return jnp.clip(x, lo, hi), (x, lo, hi)


def _clip_inward_bwd(res, g):
    x, lo, hi = res
    # Inside: the plain gradient. Outside: only the part that moves x back inside under gradient
    # descent (x < lo and g < 0, or x > hi and g > 0), so a parameter that overshot a bound is held
    # there but can come back, instead of being stuck by a zero gradient.
    inward = ((x >= lo) & (x <= hi)) | ((x < lo) & (g < 0)) | ((x > hi) & (g > 0))
    return jnp.where(inward, g, 0.0), None, None


_clip_inward.defvjp(_clip_inward_fwd, _clip_inward_bwd)


def bounded_temperature(
    log_tau: jax.Array,
    *,
    min_temperature: float = MIN_TEMPERATURE,
    max_temperature: float = MAX_TEMPERATURE,
    learnable: bool = True,
) -> jax.Array:
    """``exp(clip(log_tau, log min, log max))``, in float32. Gradient w.r.t. ``log_tau``: exact
    inside the bounds; outside, passed only when descent moves ``log_tau`` back inside (projected
    gradient); zero when not ``learnable``."""
    log_tau = jnp.asarray(log_tau, jnp.float32)
    if not learnable:
        log_tau = jax.lax.stop_gradient(log_tau)
    lo, hi = jnp.float32(math.log(min_temperature)), jnp.float32(math.log(max_temperature))
    return jnp.exp(_clip_inward(log_tau, lo, hi))


class Temperature(nnx.Module):
    """InfoNCE temperature tau held as ``log_tau`` and clipped to [min, max] in the forward pass.

    ``learnable=True``: ``log_tau`` is an ``nnx.Param`` (trained with the model; put it in a
    no-weight-decay group). ``learnable=False``: a :class:`FixedTemperature` variable, which the
    optimiser does not see, and its gradient is stopped as well. U-MARVEL: init 0.05, fixed in the
    text and caption stages, learnable from the M-BEIR stage on.
    """

    def __init__(
        self,
        init: float = 0.05,
        *,
        learnable: bool = True,
        min_temperature: float = MIN_TEMPERATURE,
        max_temperature: float = MAX_TEMPERATURE,
    ):
        if not 0 < min_temperature <= init <= max_temperature:
            raise ValueError(
                f"temperature: need 0 < min <= init <= max, got {min_temperature}, {init}, {max_temperature}"
            )
        self.learnable = learnable
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        kind = nnx.Param if learnable else FixedTemperature
        self.log_tau = kind(jnp.asarray(math.log(init), jnp.float32))

    def __call__(self) -> jax.Array:
        """The current temperature, a float32 scalar."""
        return bounded_temperature(
            self.log_tau[...],
            min_temperature=self.min_temperature,
            max_temperature=self.max_temperature,
            learnable=self.learnable,
        )


# --------------------------------------------------------------------------------------------------
# InfoNCE


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of ``x`` scaled to unit L2 norm, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _masked_ce(logits: jax.Array, keep: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row cross-entropy ``logsumexp(logits[keep]) - logits[target]`` and whether the argmax over
    the kept entries is the target. ``target`` is a one-hot bool mask (always kept)."""
    masked = jnp.where(keep, logits, -jnp.inf)
    lse = jax.nn.logsumexp(masked, axis=-1)
    pos = jnp.sum(jnp.where(target, logits, 0.0), axis=-1)
    # Correct when the target beats every other kept entry (ties count as wrong).
    best_other = jnp.max(jnp.where(target, -jnp.inf, masked), axis=-1)
    return lse - pos, pos > best_other


def info_nce(
    q: jax.Array,
    c: jax.Array,
    *,
    positive_index: jax.Array,
    positive_mask: jax.Array | None = None,
    same_did: jax.Array | None = None,
    temperature: jax.Array | float,
    symmetric: bool = False,
    symmetric_reduction: str = "mean",
    normalize: bool = False,
) -> tuple[jax.Array, Metrics]:
    """InfoNCE of each query against every candidate of the (global) batch.

    Args:
      q: [B, D] query embeddings; c: [C, D] candidate embeddings; L2-normalised unless ``normalize``.
        Any float dtype; scores are computed and reduced in float32.
      positive_index: [B] int, the candidate that is query b's target (its sampled positive).
      positive_mask: [B, C] bool, candidates that are labelled positives of query b. Besides the
        target, they are in-batch false negatives and left out of b's denominator.
      same_did: [B, C] bool, candidates with the same did as query b's target (duplicates of the
        target from other queries' positives or negatives); also left out (see :func:`same_did_mask`).
      temperature: scalar tau; ``scores = q @ c.T / tau``.
      symmetric: also the candidate->query loss of each target over the B queries (caption stage);
        the loss is then the mean (``symmetric_reduction="mean"``) or, as U-MARVEL's code has it, the
        sum (``"sum"``) of the two directions.
      normalize: L2-normalise ``q`` and ``c`` (in float32) first.

    Masking: a pair (query b', candidate j) is "excluded" when j is a labelled positive of b', has the
    same did as b''s target, or is b''s target. Query->candidate, query b's denominator holds its
    target plus every non-excluded candidate. Candidate->query, target ``t = positive_index[b]``'s
    denominator holds query b plus every query b' for which (b', t) is not excluded: the same pair
    rule read along the other axis, so a duplicated positive (two queries sharing a target did, or
    sharing a target index) is a negative in neither direction.

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``accuracy`` (query->candidate argmax over the kept
      candidates is the target), ``pos_score`` (mean cosine of the targets), ``neg_score`` (mean
      cosine of the kept negatives), ``temperature``; with ``symmetric`` also ``loss_q2c``,
      ``loss_c2q``, ``accuracy_c2q``.
    """
    if normalize:
        q, c = l2_normalize(q), l2_normalize(c)
    dtype = jnp.result_type(q.dtype, c.dtype)
    q, c = q.astype(dtype), c.astype(dtype)
    b, n = q.shape[0], c.shape[0]
    # bf16 x bf16 products are exact in float32, so this equals the float32 product of the upcast
    # inputs; HIGHEST keeps float32 inputs off reduced-precision (TF32) paths.
    cos = jnp.einsum("bd,cd->bc", q, c, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    tau = jnp.asarray(temperature, jnp.float32)
    logits = cos / tau

    positive_index = jnp.asarray(positive_index, jnp.int32)
    target = positive_index[:, None] == jnp.arange(n, dtype=jnp.int32)[None, :]  # [B, C]
    excluded = target
    if positive_mask is not None:
        excluded = excluded | positive_mask.astype(bool)
    if same_did is not None:
        excluded = excluded | same_did.astype(bool)
    keep = ~excluded | target

    loss_q2c, correct = _masked_ce(logits, keep, target)
    loss_q2c = jnp.mean(loss_q2c)
    negatives = keep & ~target
    metrics: Metrics = {
        "accuracy": jnp.mean(correct.astype(jnp.float32)),
        "pos_score": jnp.mean(jnp.sum(jnp.where(target, cos, 0.0), axis=-1)),
        "neg_score": jnp.sum(jnp.where(negatives, cos, 0.0)) / jnp.maximum(jnp.sum(negatives), 1),
        "temperature": tau,
    }
    if not symmetric:
        return loss_q2c, {"loss": loss_q2c, **metrics}

    # Candidate -> query over the B targets: the target columns of the score matrix, transposed
    # ([B targets, B queries]; a gather along the candidate axis, no [B, B, C] intermediate).
    logits_t = jnp.take(logits, positive_index, axis=1).T
    excluded_t = jnp.take(excluded, positive_index, axis=1).T
    eye = jnp.eye(b, dtype=bool)
    loss_c2q, correct_t = _masked_ce(logits_t, ~excluded_t | eye, eye)
    loss_c2q = jnp.mean(loss_c2q)
    if symmetric_reduction not in ("mean", "sum"):
        raise ValueError(f"symmetric_reduction must be 'mean' or 'sum', got {symmetric_reduction!r}")
    loss = loss_q2c + loss_c2q if symmetric_reduction == "sum" else 0.5 * (loss_q2c + loss_c2q)
    return loss, {
        "loss": loss,
        "loss_q2c": loss_q2c,
        "loss_c2q": loss_c2q,
        "accuracy_c2q": jnp.mean(correct_t.astype(jnp.float32)),
        **metrics,
    }


def same_did_mask(dids: Sequence[str], positive_index: Sequence[int] | np.ndarray) -> np.ndarray:
    """Host-side ``same_did`` [B, C] for :func:`info_nce`: candidate j has the did of query b's target
    (``dids`` is ``batch["meta"]["dids"]``)."""
    codes = {d: i for i, d in enumerate(dict.fromkeys(dids))}
    ids = np.array([codes[d] for d in dids], dtype=np.int64)
    return ids[np.asarray(positive_index)][:, None] == ids[None, :]


# --------------------------------------------------------------------------------------------------
# Distillation


def teacher_scores(cosine: jax.Array, p_yes: jax.Array, w: float = 1.0) -> jax.Array:
    """U-MARVEL distillation teacher: retriever cosine + ``w`` * reranker P(yes)."""
    return cosine.astype(jnp.float32) + w * p_yes.astype(jnp.float32)


def listwise_distillation(
    student_scores: jax.Array,
    teacher_scores: jax.Array,
    *,
    tau: jax.Array | float,
    mask: jax.Array | None = None,
    teacher_scale: float = 1.0,
    eps: float = 0.0,
) -> jax.Array:
    """``KL(softmax(teacher_scale * teacher / tau) || softmax(student / tau))`` over each query's candidate
    list, mean over queries (PyTorch's ``kl_div(..., reduction="batchmean")``, U-MARVEL's stage 5).

    Args:
      student_scores, teacher_scores: [B, K] scores of the same K candidates (e.g. cosine for the
        student, :func:`teacher_scores` for the teacher). The teacher gets no gradient.
      tau: the temperature (no tau^2 factor is applied); it gets gradient through the student side only
        (U-MARVEL divides the teacher by the detached temperature).
      mask: [B, K] bool, the valid list entries; padding is dropped from both softmaxes. Queries with
        no valid entry are left out of the mean.
      teacher_scale: multiplies the teacher's scores (U-MARVEL: 0.5, its fused score "divided by 2").
      eps: > 0 takes ``log(q + eps)`` of the student's probabilities ``q`` (U-MARVEL's ``compute_kl_divergence``
        has 1e-8): candidates the student gives less than ~eps cost at most ``-log(eps)`` each, which changes
        the loss and its gradient wherever the student is confident (small tau); 0: the exact KL.
    """
    s = student_scores.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_scores.astype(jnp.float32) * teacher_scale)
    tau = jnp.asarray(tau, jnp.float32)
    tau_t = jax.lax.stop_gradient(tau)
    keep = jnp.ones(s.shape, bool) if mask is None else mask.astype(bool)
    rows = jnp.any(keep, axis=-1)
    safe = keep | ~rows[:, None]  # an all-padding row is softmaxed whole (finite, then dropped)
    log_ps = jax.nn.log_softmax(jnp.where(safe, s / tau, -jnp.inf), axis=-1)
    log_pt = jax.nn.log_softmax(jnp.where(safe, t / tau_t, -jnp.inf), axis=-1)
    if eps > 0:
        log_ps = jnp.log(jnp.exp(log_ps) + eps)
    kl = jnp.sum(jnp.where(keep, jnp.exp(log_pt) * (log_pt - log_ps), 0.0), axis=-1)
    return jnp.sum(jnp.where(rows, kl, 0.0)) / jnp.maximum(jnp.sum(rows), 1)
