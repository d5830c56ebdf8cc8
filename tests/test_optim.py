"""AdamW + warm-up/cosine: schedule formula, clipping, decay masks, lr groups, float32 master weights."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmret import lora
from mmret.optim import OptimizerConfig, decay_mask, group_labels, lr_schedule, make_optimizer, map_paths


def reference_lr(step: int, peak: float, warmup: int, total: int, end: float) -> float:
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_schedule_follows_the_formula():
    cfg = OptimizerConfig(learning_rate=4e-4, total_steps=1000, warmup_ratio=0.03, end_lr_ratio=0.1)
    assert cfg.num_warmup_steps == 30
    sched = lr_schedule(cfg)
    assert float(sched(0)) == 0.0
    assert float(sched(30)) == pytest.approx(4e-4, rel=1e-6)  # end of warm-up: the peak
    assert float(sched(1000)) == pytest.approx(4e-5, rel=1e-6)  # end of cosine: end_lr_ratio * peak
    assert float(sched(5000)) == pytest.approx(4e-5, rel=1e-6)  # and stays there
    for step in (1, 15, 29, 31, 100, 515, 999):
        assert float(sched(step)) == pytest.approx(reference_lr(step, 4e-4, 30, 1000, 4e-5), rel=1e-5)
    # ceil, as the Hugging Face trainer; explicit steps win; zero warm-up starts at the peak.
    assert OptimizerConfig(total_steps=101, warmup_ratio=0.03).num_warmup_steps == 4
    assert OptimizerConfig(total_steps=100, warmup_steps=7).num_warmup_steps == 7
    zero_warmup = lr_schedule(OptimizerConfig(learning_rate=1e-3, total_steps=10, warmup_steps=0))
    assert float(zero_warmup(0)) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(total_steps=0), "total_steps"),
        (dict(warmup_steps=20, total_steps=10), "warmup_steps"),
        (dict(warmup_ratio=1.5), "warmup_ratio"),
        (dict(clip_grad_norm=0.0), "clip_grad_norm"),
        (dict(learning_rate=-1.0), "learning rates"),
        (dict(no_decay=("(",)), "missing"),
    ],
)
def test_bad_config_is_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kw)


def tree() -> dict[str, dict[str, jax.Array]]:
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jax.random.normal(k[1], (3,))},
        "other": {"kernel": jax.random.normal(k[2], (5,))},
        "log_temperature": jax.random.normal(k[3], ()),
    }


def test_clipping_caps_the_global_norm():
    cfg = OptimizerConfig(learning_rate=1e-2, total_steps=10, warmup_steps=0, clip_grad_norm=0.5)
    no_clip = OptimizerConfig(**{**cfg.__dict__, "clip_grad_norm": None})
    params = tree()
    grads = [jax.tree.map(lambda x, s=s: s * jnp.ones_like(x), params) for s in (10.0, 0.01, 3.0)]

    def run(tx, gs):
        state, out = tx.init(params), []
        for g in gs:
            u, state = tx.update(g, state, params)
            out.append(u)
        return out

    def clip(g):
        return jax.tree.map(lambda x: x * min(1.0, 0.5 / float(optax.tree.norm(g))), g)

    clipped = run(make_optimizer(cfg), grads)
    by_hand = run(make_optimizer(no_clip), [clip(g) for g in grads])
    unclipped = run(make_optimizer(no_clip), grads)
    for a, b in zip(clipped, by_hand, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), a, b)
    diff = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.abs(x - y).max(), clipped[1], unclipped[1]))
    assert max(float(d) for d in diff) > 1e-4  # clipping changed the run


def test_decay_mask_excludes_biases_norms_embeddings_and_temperature():
    names = {
        "language_model.embed_tokens.embedding": False,
        "language_model.layers.layers.self_attn.q_proj.bias": False,
        "language_model.layers.layers.self_attn.q_proj.kernel": True,
        "language_model.layers.layers.0.input_layernorm.scale": False,
        "language_model.norm.scale": False,
        "visual.blocks.layers.norm1.bias": False,
        "visual.blocks.layers.norm1.scale": False,
        "visual.merger.ln_q.scale": False,
        "visual.merger.mlp_0.kernel": True,
        "language_model.layers.layers.mlp.up_proj.lora_a": True,
        "log_temperature": False,
    }
    assert decay_mask({n: jnp.zeros(()) for n in names}) == names
    # nnx State of Variables (what nnx.Optimizer's init sees) and of plain arrays (its update).
    state = nnx.state(Tiny(), nnx.Param)
    for t in (state, nnx.as_pure(state)):
        assert sorted(jax.tree.leaves(map_paths(lambda p, _: p, t))) == [
            f"{m}.{p}" for m in ("body", "frozen", "head") for p in ("bias", "kernel")
        ]

    # Zero gradients: decayed leaves shrink by (1 - lr * wd), the others stay put.
    cfg = OptimizerConfig(learning_rate=0.1, total_steps=10, warmup_steps=0, weight_decay=0.5, clip_grad_norm=None)
    params = tree()
    tx = make_optimizer(cfg)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], params["dense"]["kernel"] * 0.95, rtol=1e-6)
    np.testing.assert_allclose(new["other"]["kernel"], params["other"]["kernel"] * 0.95, rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
    np.testing.assert_array_equal(new["log_temperature"], params["log_temperature"])


def test_learning_rate_groups():
    cfg = OptimizerConfig(
        learning_rate=1e-3, total_steps=10, warmup_steps=0, clip_grad_norm=None, lr_groups={r".*temperature": 0.1}
    )
    params = tree()
    assert group_labels(params, cfg.lr_groups)["log_temperature"] == "group0"
    tx = make_optimizer(cfg)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)  # Adam's first step: -lr * sign(g)
    np.testing.assert_allclose(updates["log_temperature"], -0.1, rtol=1e-5)
    np.testing.assert_allclose(updates["dense"]["kernel"], -1e-3, rtol=1e-5)


class Tiny(nnx.Module):
    """bfloat16 compute, float32 parameters, a part to freeze."""

    def __init__(self, param_dtype=jnp.float32):
        kw = dict(dtype=jnp.bfloat16, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        self.frozen = nnx.Linear(8, 8, **kw)
        self.body = nnx.Linear(8, 8, **kw)
        self.head = nnx.Linear(8, 4, **kw)

    def __call__(self, x):
        return self.head(jax.nn.gelu(self.body(self.frozen(x))))


def test_float32_master_weights_with_bf16_compute_and_nnx_optimizer():
    model = Tiny()
    lora.apply_lora(model, rank=2, alpha=4, target=r"body|head")
    wrt = lora.trainable_filter([r"frozen\..*"])
    cfg = OptimizerConfig(learning_rate=1e-2, total_steps=5, warmup_steps=1, weight_decay=0.1)
    optimizer = nnx.Optimizer(model, make_optimizer(cfg), wrt=wrt)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    frozen = np.asarray(model.frozen.kernel[...])

    @nnx.jit
    def step(model, optimizer, x):
        def loss(m):
            y = m(x)
            assert y.dtype == jnp.bfloat16
            return jnp.mean(jnp.square(y.astype(jnp.float32) - 1.0))

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer, x)) for _ in range(5)]
    assert losses[-1] < losses[1]  # step 0 has lr 0 (warm-up)
    np.testing.assert_array_equal(model.frozen.kernel[...], frozen)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(optimizer, nnx.optimizer.OptState)) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="master weights must be float32"):
        nnx.Optimizer(Tiny(jnp.bfloat16), make_optimizer(cfg), wrt=nnx.Param)
