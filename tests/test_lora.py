"""LoRA: identity at init, parameter count, merge equivalence and layout, dropout, freezing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmret import lora
from mmret.convert.checkpoint import param_shapes
from mmret.models import qwen2_vl
from mmret.models.partitioning import LOGICAL_AXES, logical_axes

IMG = 150
H, MLP, HEADS, KV, LAYERS = 64, 96, 4, 2, 2


def tiny(scan: bool) -> qwen2_vl.Qwen2VLConfig:
    return qwen2_vl.Qwen2VLConfig(
        vision=qwen2_vl.VisionConfig(depth=1, embed_dim=32, num_heads=2, out_hidden_size=H, mlp_ratio=2),
        text=qwen2_vl.TextConfig(
            vocab_size=200,
            hidden_size=H,
            intermediate_size=MLP,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV,
            mrope_section=(2, 3, 3),
        ),
        image_token_id=IMG,
        video_token_id=151,
        vision_start_token_id=152,
        vision_end_token_id=153,
        scan_layers=scan,
    )


@functools.cache
def _base(scan: bool) -> nnx.Module:
    """Random weights drawn with numpy into the abstract model (no XLA compile: fast on CPU)."""
    rng = np.random.default_rng(0)
    graphdef, state = nnx.split(qwen2_vl.abstract(tiny(scan)))
    flat_state = nnx.to_flat_state(state)
    for path, var in flat_state:
        noise = rng.standard_normal(var.shape).astype(var.dtype)
        var.set_value(jnp.asarray(1.0 + 0.1 * noise if path[-1] == "scale" else 0.05 * noise))
    return nnx.merge(graphdef, nnx.from_flat_state(flat_state))


def base(scan: bool) -> nnx.Module:
    """A fresh copy of the tiny random model (created once per layout)."""
    return nnx.clone(_base(scan))


def inputs(image: bool = False) -> dict[str, np.ndarray]:
    """Two right-padded rows; with ``image`` the first holds a 1x4x4-patch image (4 image tokens)."""
    rows = [[1, 2, 152, *[IMG] * 4, 153, 3, 4], [5, 6, 7]] if image else [[1, 2, 3, 4, 5, 6], [5, 6, 7]]
    ids = np.zeros((2, 10), np.int32)
    mask = np.zeros((2, 10), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    out = dict(input_ids=ids, attention_mask=mask)
    if image:
        pv = np.random.default_rng(0).standard_normal((16, 1176)).astype(np.float32)
        out.update(pixel_values=pv, image_grid_thw=np.array([[1, 4, 4]]))
    return out


@nnx.jit
def _forward(model: nnx.Module, batch: dict[str, np.ndarray]) -> jax.Array:
    return model(**batch).last_hidden_state


def hidden(model: nnx.Module) -> np.ndarray:
    return np.asarray(_forward(model, inputs()))


def perturb_lora(model: nnx.Module, seed: int = 0) -> None:
    """Train-like random A and B (B is zero at init, which would hide merge errors)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(jnp.asarray(0.05 * rng.standard_normal(var.shape), var.dtype))


def flat(model: nnx.Module, wrt=nnx.Param) -> dict[str, np.ndarray]:
    return {lora.dotted(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, wrt))}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_identity_at_init_and_logical_names(scan):
    model = base(scan)
    ref = hidden(model)
    lora.apply_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(hidden(model), ref)
    adapters = nnx.state(model, nnx.LoRAParam)
    shapes = [x.shape for x in jax.tree.leaves(adapters)]
    specs = jax.tree.leaves(logical_axes(adapters), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(shapes) == len(specs) == 2 * 7 * (1 if scan else LAYERS)
    for shape, spec in zip(shapes, specs, strict=True):
        assert len(spec) == len(shape) and all(n in LOGICAL_AXES for n in spec)
        assert "lora_rank" in spec and (spec[0] == "layers") == scan
    if scan:
        q = model.language_model.layers.layers.self_attn.q_proj
        assert q.lora_a.shape == (LAYERS, H, 4) and q.lora_b.shape == (LAYERS, 4, H)
        assert tuple(logical_axes(nnx.state(q))["lora_a"]) == ("layers", "embed", "lora_rank")


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_trainable_count_is_analytic(scan):
    r = 8
    model = lora.apply_lora(base(scan), rank=r, alpha=16)
    kv = KV * H // HEADS
    per_layer = r * ((H + H) + 2 * (H + kv) + (H + H) + 3 * (H + MLP))  # q, k, v, o, gate, up, down
    assert lora.count_params(model, lora.trainable_filter(lora.FREEZE_VISION, lora_only=True)) == LAYERS * per_layer
    assert lora.count_params(model, nnx.LoRAParam) == LAYERS * per_layer


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_merge_equals_lora_and_restores_the_plain_layout(scan):
    model = base(scan)
    before = {k: (v.shape, v.dtype) for k, v in flat(model).items()}
    plain = hidden(model)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.1, rngs=nnx.Rngs(2))
    perturb_lora(model)
    model.eval()  # dropout off
    with_lora = hidden(model)
    assert np.abs(with_lora - plain).max() > 0.1  # the adapters matter
    lora.merge_lora(model)
    np.testing.assert_allclose(hidden(model), with_lora, atol=1e-5, rtol=0)
    assert not lora.lora_layers(model)
    assert not jax.tree.leaves(nnx.state(model, nnx.Any(nnx.LoRAParam, lora.LoRADropoutKey)))
    assert all(type(m) is not lora.LoRALinear for _, m in nnx.iter_modules(model))
    after = {k: (v.shape, v.dtype) for k, v in flat(model).items()}
    assert after == before
    # Exactly what the conversion tool expects for this config.
    assert after == {lora.dotted(p): (s.shape, s.dtype) for p, s in param_shapes(tiny(scan)).items()}
    lora.apply_lora(model, rank=2, alpha=4)  # the next stage starts from the merged model


def test_dropout_masks_follow_the_key_and_mode():
    model = lora.apply_lora(base(True), rank=4, alpha=8, dropout=0.5, rngs=nnx.Rngs(3))
    perturb_lora(model)
    model.eval()
    clean = hidden(model)
    model.train()
    lora.set_dropout_key(model, jax.random.key(0))
    a, a2 = hidden(model), hidden(model)
    lora.set_dropout_key(model, jax.random.key(1))
    b = hidden(model)
    np.testing.assert_array_equal(a, a2)  # a key gives the same masks (GradCache re-forward)
    assert np.abs(a - clean).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    model.eval()
    np.testing.assert_array_equal(hidden(model), clean)


def test_apply_errors():
    model = base(True)
    with pytest.raises(ValueError, match="matches no"):
        lora.apply_lora(model, rank=4, alpha=8, target=r"nothing\..*")
    lora.apply_lora(model, rank=4, alpha=8)
    with pytest.raises(ValueError, match="already applied"):
        lora.apply_lora(model, rank=4, alpha=8)


def loss_fn(model: nnx.Module, batch: dict[str, np.ndarray]) -> jax.Array:
    return jnp.mean(jnp.square(model(**batch).last_hidden_state - 1.0))


def train_steps(model: nnx.Module, wrt, steps: int) -> tuple[nnx.State, nnx.Optimizer]:
    """``steps`` Adam steps on an image batch, differentiating only ``wrt``; the last gradients."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)

    @nnx.jit
    def step(model, optimizer, batch):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, batch)
        optimizer.update(model, grads)
        return grads

    for _ in range(steps):
        grads = step(model, optimizer, inputs(image=True))
    return grads, optimizer


def changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not np.array_equal(before[k], after[k])}


def test_umarvel_freezing_trains_only_the_adapters():
    model = lora.apply_lora(base(True), rank=4, alpha=8)
    wrt = lora.trainable_filter(lora.FREEZE_VISION, lora_only=True)
    before = flat(model)
    grads, optimizer = train_steps(model, wrt, steps=2)
    adapters = set(flat(model, nnx.LoRAParam))
    assert set(flat(grads, nnx.Variable)) == adapters
    assert changed(before, flat(model)) == adapters  # A moves at step 2, once B is non-zero
    assert all(np.abs(g).max() > 0 for g in flat(grads, nnx.Variable).values())


def test_freezing_the_vision_tower_without_lora():
    model = base(True)
    before = flat(model)
    grads, optimizer = train_steps(model, lora.trainable_filter(lora.FREEZE_VISION), steps=1)
    llm = {k for k in before if not k.startswith("visual.")}
    assert set(flat(grads, nnx.Variable)) == llm
    assert changed(before, flat(model)) == llm  # the vision tower is unchanged bit for bit
    assert not any("visual" in lora.dotted(p) for p, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state)))


def test_trainable_filter_composes():
    class WithTemperature(nnx.Module):
        def __init__(self):
            self.backbone = lora.apply_lora(base(False), rank=2, alpha=4)
            self.log_temperature = nnx.Param(jnp.log(jnp.float32(0.05)))

    m = WithTemperature()
    names = set(flat(m, lora.trainable_filter(lora.FREEZE_VISION, lora_only=True)))
    assert "log_temperature" in names and all(".lora_" in n for n in names - {"log_temperature"})
    fixed_temp = nnx.All(lora.trainable_filter(lora_only=True), nnx.Not(lora.PathRegex(r"log_temperature")))
    assert "log_temperature" not in set(flat(m, fixed_temp))
    full = set(flat(m, lora.trainable_filter((r"backbone\.visual\..*",))))
    assert "backbone.language_model.embed_tokens.embedding" in full
    assert not any(n.startswith("backbone.visual.") for n in full)
    with pytest.raises(ValueError, match="bad path regex"):
        lora.PathRegex("(")
