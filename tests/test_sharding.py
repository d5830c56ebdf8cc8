"""Mesh, rules and shardings on 8 simulated CPU devices (see conftest.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmret import sharding as sh
from mmret.models import qwen2_vl
from mmret.models.partitioning import LOGICAL_AXES
from mmret.models.qwen2_vl.position_ids import mrope_position_ids
from mmret.models.qwen2_vl.presets import hf_config

THRESHOLD = 2**14
IMG, VS, VE = 500, 501, 502  # image pad, vision start, vision end ids of the test vocabulary


def small_config() -> qwen2_vl.Qwen2VLConfig:
    """Small enough to compile fast, wide enough that most weights exceed THRESHOLD elements."""
    return qwen2_vl.Qwen2VLConfig(
        vision=qwen2_vl.VisionConfig(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2, out_hidden_size=128),
        text=qwen2_vl.TextConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(4, 6, 6),
        ),
        image_token_id=IMG,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )


@pytest.fixture(scope="module")
def mesh222():
    return sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def sharded(mesh222):
    return sh.shard_model(lambda: qwen2_vl.create(small_config(), seed=3), mesh222)


def specs(shardings) -> dict[str, P]:
    leaves = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p[:-1]): s.spec for p, s in leaves}


# Mesh ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, expected",
    [
        ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
        ({"fsdp": 8}, (1, 8, 1)),
        ({"data": 1, "fsdp": 2, "tensor": -1}, (1, 2, 4)),
        ((2, 2, 2), (2, 2, 2)),
        ([-1, 4, 1], (2, 4, 1)),
    ],
)
def test_make_mesh_shapes(shape, expected):
    mesh = sh.make_mesh(shape)
    assert mesh.axis_names == sh.MESH_AXES
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_a_subset_of_devices():
    mesh = sh.make_mesh({"data": -1, "tensor": 2}, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "fake"


def test_multi_slice_devices_split_data_across_slices():
    devices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
    grid = sh.hybrid_device_grid(sh.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8), devices)
    assert grid.shape == (2, 2, 2)
    for d in range(2):  # each data row lies in one slice: fsdp and tensor never cross slices
        assert {x.slice_index for x in grid[d].flat} == {d}
    with pytest.raises(ValueError, match=r"mesh\.data=1 must be a multiple of the 2 slices"):
        sh.hybrid_device_grid((1, 8, 1), devices)


@pytest.mark.parametrize(
    "shape, match",
    [
        ({"data": 3, "fsdp": -1}, r"mesh\.data=3 .*= 3 does not divide the 8 devices \(mesh\.fsdp=-1\)"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, r"= 4, but there are 8 devices.*-1"),
        ({"data": -1, "fsdp": -1}, r"at most one axis may be -1.*mesh\.data=-1, mesh\.fsdp=-1"),
        ({"dta": 2}, r"mesh\.dta: unknown mesh axis"),
        ({"data": 0, "fsdp": -1}, r"mesh\.data=0: a size must be positive"),
        ({"data": -2}, r"mesh\.data=-2"),
        ({"data": "2", "fsdp": -1}, r"mesh\.data='2': a size must be an int"),
        ((2, 4), r"must give 3 sizes"),
        ({"data": 16}, r"= 16, but there are 8 devices"),
    ],
)
def test_bad_mesh_config_is_rejected_naming_the_key(shape, match):
    with pytest.raises(ValueError, match=match):
        sh.make_mesh(shape)


# Rules ---------------------------------------------------------------------------------------------


def test_default_rules_cover_every_logical_name():
    keys = {k for k, _ in sh.DEFAULT_RULES}
    assert set(LOGICAL_AXES) <= keys
    assert keys == set(sh.KNOWN_AXES)
    assert sh.make_rules() == sh.DEFAULT_RULES
    assert sh.make_rules(sh.DEFAULT_RULES) == sh.DEFAULT_RULES


@pytest.mark.parametrize(
    "rules, match",
    [
        ((("embedd", "fsdp"),), r"sharding\.rules: unknown logical axis 'embedd'"),
        ({"embed": "fsdpp"}, r"sharding\.rules\['embed'\]: unknown mesh axis 'fsdpp'"),
        ({"batch": ("data", "data")}, r"sharding\.rules\['batch'\]: mesh axis repeated"),
        ((("embed",),), r"each rule is a \(logical name, mesh axes\) pair"),
        ({"embed": 3}, r"sharding\.rules\['embed'\]: mesh axes must be None"),
    ],
)
def test_bad_rules_are_rejected_naming_the_key(rules, match):
    with pytest.raises(ValueError, match=match):
        sh.make_rules(rules)


def test_rules_from_a_mapping_and_overrides():
    assert sh.make_rules({"embed": "fsdp", "batch": ["data", "fsdp"]}) == (
        ("embed", "fsdp"),
        ("batch", ("data", "fsdp")),
    )
    rules = sh.make_rules(overrides={"heads": None, "embed": ("fsdp", "tensor")})
    assert [v for k, v in rules if k == "heads"] == [None]
    assert [v for k, v in rules if k == "embed"] == [("fsdp", "tensor")]
    assert len(rules) == len(sh.DEFAULT_RULES) - 1  # both "heads" entries replaced by one
    with pytest.raises(ValueError, match="unknown logical axis 'mlpp'"):
        sh.make_rules(overrides={"mlpp": None})


def test_logical_to_mesh_uses_a_mesh_axis_at_most_once():
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("length", None))
    assert sh.logical_to_mesh(P("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
    assert sh.logical_to_mesh(("embed", "embed", "mlp"), rules) == P("fsdp", None, "tensor")
    assert sh.logical_to_mesh(("embed", "batch"), rules) == P("fsdp", None)
    assert sh.logical_to_mesh((None, "mlp"), rules) == P(None, "tensor")
    assert sh.logical_to_mesh(("vocab",), rules) == P(None)  # known, but no rule: replicated
    with pytest.raises(ValueError, match="unknown logical axis 'emb'"):
        sh.logical_to_mesh(("emb",), rules)


def test_logical_to_mesh_fallbacks_and_mesh_awareness():
    rules = sh.DEFAULT_RULES
    no_tp = sh.make_mesh({"fsdp": 8})
    tp = sh.make_mesh({"fsdp": 2, "tensor": 4})
    # Without a mesh (or with tensor > 1) the first choice wins.
    assert sh.logical_to_mesh(("layers", "heads"), rules) == P(None, "tensor")
    assert sh.logical_to_mesh(("layers", "heads"), rules, tp, (2, 64)) == P(None, "tensor")
    # Tensor of size 1: a bias over heads falls back to fsdp ...
    assert sh.logical_to_mesh(("layers", "heads"), rules, no_tp, (2, 64)) == P(None, "fsdp")
    # ... but first choices settle before fallbacks: embed keeps fsdp in a heads x embed kernel.
    assert sh.logical_to_mesh(("heads", "embed"), rules, no_tp, (64, 64)) == P(None, "fsdp")
    assert sh.logical_to_mesh(("heads", "embed"), rules, tp, (64, 64)) == P("tensor", "fsdp")
    # A candidate that does not divide the dim is skipped.
    assert sh.logical_to_mesh(("vocab", "embed"), rules, tp, (6, 9)) == P(None, None)
    assert sh.logical_to_mesh(("batch", "length"), rules, sh.make_mesh((2, 2, 2)), (6, 8)) == P(None, None)
    with pytest.raises(ValueError, match="rank"):
        sh.logical_to_mesh(("embed",), rules, tp, (4, 4))


# Parameters ----------------------------------------------------------------------------------------


def test_shard_model_places_every_parameter_per_the_rules(sharded, mesh222):
    state = nnx.state(sharded)
    expected = sh.param_shardings(state, mesh222)
    got = jax.tree.map(lambda x: x.sharding, state)
    exp_leaves = jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, NamedSharding))
    assert len(jax.tree.leaves(got)) == len(exp_leaves) > 20
    for g, e in zip(jax.tree.leaves(got), exp_leaves, strict=True):
        assert g.is_equivalent_to(e, 3), (g, e)
    by_path = specs(expected)
    assert by_path["language_model/embed_tokens/embedding"] == P("tensor", "fsdp")
    assert by_path["language_model/layers/layers/self_attn/q_proj/kernel"] == P(None, "fsdp", "tensor")
    assert by_path["language_model/layers/layers/self_attn/o_proj/kernel"] == P(None, "tensor", "fsdp")
    assert by_path["language_model/layers/layers/mlp/down_proj/kernel"] == P(None, "tensor", "fsdp")
    assert by_path["language_model/layers/layers/input_layernorm/scale"] == P(None, "fsdp")
    assert by_path["visual/patch_embed/proj/kernel"] == P(None, "fsdp")
    assert by_path["visual/blocks/layers/attn/qkv/kernel"] == P(None, "fsdp", "tensor")


def test_shard_model_values_equal_the_unsharded_init(sharded):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ref = jax.jit(lambda: nnx.state(qwen2_vl.create(small_config(), seed=3)), out_shardings=one)()
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_place_model_and_sharded_abstract(sharded, mesh222):
    graphdef, state = nnx.split(sharded)
    model = nnx.merge(graphdef, jax.device_get(state))  # host (numpy) copies, e.g. as loaded
    expected = jax.tree.leaves(sh.param_shardings(state, mesh222), is_leaf=lambda x: isinstance(x, NamedSharding))
    sh.place_model(model, mesh222)
    for x, s in zip(jax.tree.leaves(nnx.state(model)), expected, strict=True):
        assert x.sharding == s
    abstract = sh.sharded_abstract(qwen2_vl.abstract(small_config()), mesh222)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(nnx.state(model)), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct) and a.shape == x.shape and a.sharding == x.sharding


@pytest.mark.parametrize("preset", ["qwen2vl-2b", "qwen2vl-7b"])
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (2, 4, 1), (1, 2, 4), (4, 2, 1)])
def test_with_fsdp_no_large_parameter_is_replicated(preset, shape):
    cfg = qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_config(preset), with_lm_head=True)
    model = qwen2_vl.abstract(cfg)  # shapes only
    shardings = sh.param_shardings(model, sh.make_mesh(shape))
    assert sh.unsharded_params(model, shardings, THRESHOLD) == []
    # Every sharded dim divides evenly (jax rejects uneven shardings).
    for v, s in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(shardings), strict=True):
        s.shard_shape(v.shape)


def test_small_model_has_large_parameters_and_none_replicated(sharded, mesh222):
    state = nnx.state(sharded)
    sizes = [x.size for x in jax.tree.leaves(state)]
    assert sum(s > THRESHOLD for s in sizes) >= 10
    assert sh.unsharded_params(state, sh.param_shardings(state, mesh222), THRESHOLD) == []
    # Without fsdp the width is not sharded: the check notices.
    no_fsdp = sh.make_mesh({"data": 8})
    assert sh.unsharded_params(state, sh.param_shardings(state, no_fsdp), THRESHOLD)


def test_opt_state_mirrors_parameter_shardings(sharded, mesh222):
    params = nnx.state(sharded, nnx.Param)
    p_sh = sh.param_shardings(params, mesh222)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
    abstract = jax.eval_shape(tx.init, params)
    o_sh = sh.opt_state_shardings(abstract, p_sh, mesh222)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    adam = opt_state[1][0]
    p_leaves = jax.tree.leaves(p_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
    for moments in (adam.mu, adam.nu):
        leaves = jax.tree.leaves(moments)
        assert len(leaves) == len(p_leaves)
        for x, s in zip(leaves, p_leaves, strict=True):
            assert x.sharding.is_equivalent_to(s, x.ndim)
    assert adam.count.sharding.is_fully_replicated
    # A pure-dict copy of the params (no Variable nodes) matches the same way.
    pure_sh = sh.opt_state_shardings(jax.eval_shape(tx.init, nnx.to_pure_dict(params)), p_sh, mesh222)
    assert jax.tree.leaves(pure_sh[1][0].mu) == jax.tree.leaves(o_sh[1][0].mu)


# Batches, activations, forward ---------------------------------------------------------------------


def image_run(t: int, h: int, w: int) -> list[int]:
    return [VS] + [IMG] * (t * h * w // 4) + [VE]


def make_batch() -> dict[str, np.ndarray]:
    """4 rows (text+image, text, two images, left-padded), patch rows and grid rows padded as the
    pipeline pads them (static shapes)."""
    rows = [
        [1, 2, *image_run(1, 4, 4), 3, 4, 5],
        [6, 7, 8, 9, 10, 11],
        [12, *image_run(1, 2, 4), 13, *image_run(1, 4, 2), 14],
        [15, 16, 17, 18],
    ]
    grids = [(1, 4, 4), (1, 2, 4), (1, 4, 2)]
    length = 16
    ids = np.zeros((4, length), np.int32)
    mask = np.zeros((4, length), np.int32)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if i == 3 else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    n = sum(t * h * w for t, h, w in grids)
    pixel_values = np.zeros((n + 8, 1176), np.float32)
    pixel_values[:n] = np.random.default_rng(0).standard_normal((n, 1176))
    grid = np.zeros((4, 3), np.int32)
    grid[: len(grids)] = grids
    pos = mrope_position_ids(ids, mask, grid, image_token_id=IMG, xp=np).astype(np.int32)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid, position_ids=pos)


def test_batch_shardings_and_put_batch(mesh222):
    batch = make_batch()
    shardings = sh.batch_shardings(batch, mesh222)
    assert shardings["input_ids"].spec == P(("data", "fsdp"), None)
    assert shardings["position_ids"].spec == P(None, ("data", "fsdp"), None)
    assert shardings["pixel_values"].spec == P(("data", "fsdp"), None)
    assert sh.batch_sharding(mesh222, 3, axis=1).spec == P(None, ("data", "fsdp"), None)
    put = sh.put_batch(batch, mesh222)
    for k, x in put.items():
        assert x.sharding == shardings[k]
        np.testing.assert_array_equal(np.asarray(x), batch[k])
    assert sh.batch_shardings({"n": np.zeros(())}, mesh222)["n"].spec == P()
    with pytest.raises(ValueError, match=r"batch leaf query/input_ids: dim 0 has size 6, not divisible by the 4"):
        sh.batch_shardings({"query": {"input_ids": np.zeros((6, 3))}}, mesh222)
    with pytest.raises(TypeError, match="batch leaf meta/qids/0 is not an array"):
        sh.batch_shardings({"meta": {"qids": ["a"]}}, mesh222)


def test_with_logical_constraint(mesh222):
    x = jnp.ones((4, 6, 8))
    names = ("batch", "length", "act_mlp")
    assert sh.with_logical_constraint(x, names) is x  # no mesh: a no-op
    y = jax.jit(lambda a: sh.with_logical_constraint(a * 2, names, mesh=mesh222))(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    with jax.set_mesh(mesh222), sh.axis_rules({"batch": "data", "act_mlp": None}):
        z = jax.jit(lambda a: sh.with_logical_constraint(a * 2, names))(x)
    assert z.sharding.is_equivalent_to(NamedSharding(mesh222, P("data", None, None)), 3)
    assert sh.current_rules() == sh.DEFAULT_RULES


def test_sharded_forward_equals_unsharded(sharded, mesh222):
    graphdef, state = nnx.split(sharded)
    batch = make_batch()

    def forward(state, batch, constrain):
        out = nnx.merge(graphdef, state)(**batch).last_hidden_state
        return sh.with_logical_constraint(out, ("batch", "length", "act_embed"), mesh=mesh222) if constrain else out

    got = jax.jit(forward, static_argnums=2)(state, sh.put_batch(batch, mesh222), True)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh222, P(("data", "fsdp"))), 3)
    one = jax.devices()[0]
    ref = jax.jit(forward, static_argnums=2)(jax.device_put(state, one), jax.device_put(batch, one), False)
    assert len(ref.devices()) == 1
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(ref)).max() > 0.1
