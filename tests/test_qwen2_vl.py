"""Parity of the Flax Qwen2-VL with the Hugging Face PyTorch model (transformers' Qwen2VLModel)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmret.models import qwen2_vl  # noqa: E402
from mmret.models.qwen2_vl.position_ids import mrope_position_ids  # noqa: E402

IMG, VS, VE = 150, 152, 153  # image pad, vision start, vision end ids of the test vocabulary
RTOL = 1e-4  # max |ours - reference| relative to the reference activations' RMS


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    mrope: tuple[int, int, int]
    tied: bool
    vision_depth: int
    mlp_ratio: int = 4


SHAPES = [
    Shape("gqa2-untied", heads=4, kv_heads=2, mrope=(2, 3, 3), tied=False, vision_depth=2),
    Shape("mha-tied", heads=4, kv_heads=4, mrope=(4, 2, 2), tied=True, vision_depth=1, mlp_ratio=2),
    Shape("mqa-untied", heads=4, kv_heads=1, mrope=(1, 3, 4), tied=False, vision_depth=3),
]


def make_hf(shape: Shape, tmp_path_factory: pytest.TempPathFactory, seed: int = 0):
    """A random Hugging Face Qwen2-VL (weights perturbed well beyond init), saved to disk."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=200,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            rope_parameters={"rope_type": "default", "mrope_section": list(shape.mrope), "rope_theta": 10000.0},
            max_position_embeddings=512,
        ),
        vision_config=dict(
            depth=shape.vision_depth, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=shape.mlp_ratio
        ),
        image_token_id=IMG,
        video_token_id=151,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        tie_word_embeddings=shape.tied,
    )
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(shape.name)
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.name)
def pair(request, tmp_path_factory):
    hf, path = make_hf(request.param, tmp_path_factory)
    return hf, path


def image_run(grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return [VS] + [IMG] * (t * h * w // 4) + [VE]


@dataclasses.dataclass
class Batch:
    ids: np.ndarray
    mask: np.ndarray
    pixel_values: np.ndarray | None
    grid: np.ndarray | None


def batch(rows: list[list[int]], grids: list[tuple[int, int, int]], *, left: bool = False, seed: int = 0) -> Batch:
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    if not grids:
        return Batch(ids, mask, None, None)
    n = sum(t * h * w for t, h, w in grids)
    pv = np.random.default_rng(seed).standard_normal((n, 1176)).astype(np.float32)
    return Batch(ids, mask, pv, np.array(grids, np.int64))


CASES = {
    "text_only": batch([[1, 2, 3, 4, 5, 6, 7]], []),
    "one_image": batch([[1, 2, *image_run((1, 4, 6)), 3, 4, 5]], [(1, 4, 6)]),
    "several_images": batch(
        [[1, *image_run((1, 4, 4)), 2, 3, *image_run((1, 6, 2)), 4, *image_run((1, 2, 8)), 5]],
        [(1, 4, 4), (1, 6, 2), (1, 2, 8)],
    ),
    "padded_batch": batch(
        [[1, *image_run((1, 4, 4)), 2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12, *image_run((1, 2, 4)), 13]],
        [(1, 4, 4), (1, 2, 4)],
    ),
    "left_padding": batch(
        [[1, *image_run((1, 4, 4)), 2, 3, 4, 5, 6, 7, 8], [9, *image_run((1, 4, 2)), 10]],
        [(1, 4, 4), (1, 4, 2)],
        left=True,
    ),
}


def hf_forward(hf, b: Batch, *, causal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reference last hidden state and logits of any of the Qwen-VL families' transformers models. Bidirectional:
    the same model given an explicit padding-only 4D mask (transformers takes a prepared 4D mask as it is)."""
    kw = dict(input_ids=torch.tensor(b.ids))
    if b.pixel_values is not None:
        kw.update(
            pixel_values=torch.tensor(b.pixel_values),
            image_grid_thw=torch.tensor(b.grid),
            mm_token_type_ids=torch.tensor((b.ids == IMG).astype(np.int64)),
        )
    if causal:
        kw["attention_mask"] = torch.tensor(b.mask)
    else:
        length = b.ids.shape[1]
        m = torch.tensor(b.mask).bool()[:, None, None, :].expand(-1, 1, length, -1)
        kw["attention_mask"] = m | torch.eye(length, dtype=torch.bool)
        kw["position_ids"] = torch.tensor(np.asarray(reference_positions(hf, b)))
    with torch.no_grad():
        out = hf(**kw, output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()


def reference_positions(hf, b: Batch) -> np.ndarray:
    if b.grid is None:
        pos = np.cumsum(b.mask, axis=1) - 1
        return np.broadcast_to(np.where(b.mask > 0, pos, 0)[None], (3, *b.ids.shape))
    pos, _ = hf.model.get_rope_index(
        input_ids=torch.tensor(b.ids),
        mm_token_type_ids=torch.tensor((b.ids == IMG).astype(np.int64)),
        image_grid_thw=torch.tensor(b.grid),
        attention_mask=torch.tensor(b.mask),
    )
    return pos.numpy()


def ours(model, b: Batch, **kw):
    return model(b.ids, b.mask, b.pixel_values, b.grid, **kw)


def rel_err(got: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    valid = mask.astype(bool)
    return float(np.abs(got - ref)[valid].max() / np.sqrt(np.mean(ref[valid] ** 2)))


def test_last_hidden_state_and_logits_match_hf(pair):
    hf, path = pair
    model = qwen2_vl.from_hf(path, jnp.float32, with_lm_head=True)
    for case, b in CASES.items():
        ref_h, ref_logits = hf_forward(hf, b)
        out = ours(model, b)
        assert out.last_hidden_state.shape == ref_h.shape, case
        assert rel_err(np.asarray(out.last_hidden_state), ref_h, b.mask) < RTOL, case
        assert rel_err(np.asarray(out.logits), ref_logits, b.mask) < RTOL, case


def test_bidirectional_matches_hf_with_padding_only_mask(pair):
    hf, path = pair
    b = CASES["left_padding"]
    ref_bi, _ = hf_forward(hf, b, causal=False)
    ref_causal, _ = hf_forward(hf, b, causal=True)
    model = qwen2_vl.from_hf(path, jnp.float32, attention="bidirectional")
    got = np.asarray(ours(model, b).last_hidden_state)
    assert rel_err(got, ref_bi, b.mask) < RTOL
    assert rel_err(ref_causal, ref_bi, b.mask) > 100 * RTOL  # the two modes really differ
    # The per-call override reaches the same result from a causal model.
    causal_model = qwen2_vl.from_hf(path, jnp.float32)
    assert rel_err(np.asarray(ours(causal_model, b, causal=False).last_hidden_state), ref_bi, b.mask) < RTOL


def test_vision_tower_alone_matches_hf(pair):
    hf, path = pair
    b = CASES["several_images"]
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(b.pixel_values), grid_thw=torch.tensor(b.grid)).pooler_output.numpy()
    model = qwen2_vl.from_hf(path, jnp.float32)
    got = np.asarray(model.visual(jnp.asarray(b.pixel_values), jnp.asarray(b.grid)))
    assert got.shape == ref.shape == (b.pixel_values.shape[0] // 4, 64)
    assert rel_err(got, ref, np.ones(ref.shape)) < RTOL


@pytest.mark.parametrize("block", [16, 20])
def test_block_local_vision_attention_matches_hf(pair, block):
    """max_image_patches: attention within blocks of neighbouring patches, not across the whole batch.

    Images of 16, 12 and 16 patches: with 16-patch blocks the third image straddles two blocks; zero
    patch rows after the images (static batch padding) leave the images' features unchanged."""
    hf, path = pair
    b = CASES["several_images"]
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(b.pixel_values), grid_thw=torch.tensor(b.grid)).pooler_output.numpy()
    model = qwen2_vl.from_hf(path, jnp.float32, max_image_patches=block)
    got = np.asarray(model.visual(jnp.asarray(b.pixel_values), jnp.asarray(b.grid)))
    assert rel_err(got, ref, np.ones(ref.shape)) < RTOL
    pv = np.concatenate([b.pixel_values, np.zeros((5 * block, b.pixel_values.shape[1]), np.float32)])
    padded = np.asarray(jax.jit(model.visual)(jnp.asarray(pv), jnp.asarray(b.grid)))[: ref.shape[0]]
    assert rel_err(padded, ref, np.ones(ref.shape)) < RTOL
    # As the processor collates it: a filler grid row covers the padding rows; image_mask marks it as no image,
    # so its length (80 > block) is not held against max_image_patches.
    grid = np.concatenate([b.grid, [(1, 2, 5 * block // 2)]])
    mask = np.array([1, 1, 1, 0])
    filled = np.asarray(model.visual(jnp.asarray(pv), jnp.asarray(grid), jnp.asarray(mask)))[: ref.shape[0]]
    assert rel_err(filled, ref, np.ones(ref.shape)) < RTOL
    with pytest.raises(ValueError, match=f"an image has {5 * block // 2 * 2} patches"):
        model.visual(jnp.asarray(pv), jnp.asarray(grid))
    with pytest.raises(ValueError, match="more than max_image_patches=12"):
        qwen2_vl.from_hf(path, jnp.float32, max_image_patches=12).visual(
            jnp.asarray(b.pixel_values), jnp.asarray(b.grid)
        )


def test_position_ids_match_hf_get_rope_index(pair):
    hf, _ = pair
    jitted = jax.jit(lambda i, m, g: mrope_position_ids(i, m, g, image_token_id=IMG, xp=jnp))
    for case in [c for c in CASES if c != "text_only"]:
        b = CASES[case]
        ref = reference_positions(hf, b)
        valid = np.broadcast_to(b.mask.astype(bool)[None], ref.shape)
        for xp in (np, jnp):
            got = np.asarray(mrope_position_ids(b.ids, b.mask, b.grid, image_token_id=IMG, xp=xp))
            np.testing.assert_array_equal(got[valid], ref[valid], err_msg=case)
        # Inside jit too (shapes static, values traced).
        np.testing.assert_array_equal(np.asarray(jitted(b.ids, b.mask, b.grid))[valid], ref[valid], err_msg=case)


def test_position_ids_text_continues_after_image_at_max_plus_one():
    """Hand-made case: 2 text tokens, an image with merged grid 2x3, then text."""
    ids = np.array([[5, 5, IMG, IMG, IMG, IMG, IMG, IMG, 7]])
    pos = mrope_position_ids(ids, None, np.array([[1, 4, 6]]), image_token_id=IMG)
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 2, 2, 2, 2, 2, 5])  # t
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, 2, 2, 3, 3, 3, 5])  # h
    np.testing.assert_array_equal(pos[2, 0], [0, 1, 2, 3, 4, 2, 3, 4, 5])  # w


def test_scan_and_no_scan_agree(pair):
    _, path = pair
    b = CASES["padded_batch"]
    scanned = qwen2_vl.from_hf(path, jnp.float32, scan_layers=True)
    looped = qwen2_vl.from_hf(path, jnp.float32, scan_layers=False)
    a = np.asarray(ours(scanned, b).last_hidden_state)
    c = np.asarray(ours(looped, b).last_hidden_state)
    assert rel_err(a, c, b.mask) < 1e-5


def test_remat_and_jit_do_not_change_the_result(pair):
    _, path = pair
    b = CASES["one_image"]
    base = np.asarray(ours(qwen2_vl.from_hf(path, jnp.float32), b).last_hidden_state)
    model = qwen2_vl.from_hf(path, jnp.float32, remat="dots")

    @jax.jit
    def run(m, ids, mask, pv, grid):
        return m(ids, mask, pv, grid).last_hidden_state

    from flax import nnx

    graphdef, state = nnx.split(model)
    got = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a).last_hidden_state)(
        state, b.ids, b.mask, b.pixel_values, b.grid
    )
    assert rel_err(np.asarray(got), base, b.mask) < 1e-5


def masked_mean(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (h * m).sum(1) / m.sum(1)


def test_bfloat16_compute_keeps_pooled_cosine(pair):
    _, path = pair
    b = CASES["padded_batch"]
    f32 = np.asarray(ours(qwen2_vl.from_hf(path, jnp.float32), b).last_hidden_state)
    bf16 = ours(qwen2_vl.from_hf(path, jnp.bfloat16, param_dtype=jnp.float32), b).last_hidden_state
    assert bf16.dtype == jnp.bfloat16
    p32 = masked_mean(f32, b.mask)
    p16 = masked_mean(np.asarray(bf16.astype(jnp.float32)), b.mask)
    cos = (p32 * p16).sum(-1) / (np.linalg.norm(p32, axis=-1) * np.linalg.norm(p16, axis=-1))
    assert cos.min() >= 0.999, cos


def test_mismatched_image_tokens_are_reported(pair):
    _, path = pair
    b = CASES["one_image"]
    model = qwen2_vl.from_hf(path, jnp.float32)
    ids = np.delete(b.ids, 4, axis=1)  # one <|image_pad|> fewer than the image has features
    mask = np.delete(b.mask, 4, axis=1)
    assert (ids == IMG).sum() == (b.ids == IMG).sum() - 1
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, mask, b.pixel_values, b.grid)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(b.ids, b.mask, b.pixel_values, np.array([[1, 4, 8]]))


@pytest.mark.parametrize("preset", ["qwen2vl-2b", "qwen2vl-7b"])
def test_param_count_equals_hf_on_meta_device(preset):
    from mmret.models.qwen2_vl.presets import hf_config

    hf_cfg = hf_config(preset)
    with torch.device("meta"):
        hf = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(**hf_cfg))
    expected = sum(p.numel() for p in hf.parameters())
    cfg = qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_cfg, with_lm_head=True)
    assert qwen2_vl.count_params(qwen2_vl.abstract(cfg)) == expected
    # The published sizes, as a sanity check on the presets themselves.
    approx = {"qwen2vl-2b": 2.21e9, "qwen2vl-7b": 8.29e9}[preset]
    assert abs(expected - approx) / approx < 0.01


def test_static_padding_of_patches_and_grid_rows_changes_nothing(pair):
    """Batches of static shape: zero patch rows after the images and zero grid rows (no image)."""
    _, path = pair
    b = CASES["padded_batch"]
    model = qwen2_vl.from_hf(path, jnp.float32)
    base = np.asarray(ours(model, b).last_hidden_state)
    pv = np.concatenate([b.pixel_values, np.zeros((36, 1176), np.float32)])
    grid = np.concatenate([b.grid, np.zeros((2, 3), np.int64)])
    padded = np.asarray(model(b.ids, b.mask, pv, grid).last_hidden_state)
    assert rel_err(padded, base, b.mask) < 1e-5
    with pytest.raises(ValueError, match="patches"):
        model(b.ids, b.mask, b.pixel_values[:-4], b.grid)
