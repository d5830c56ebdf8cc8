"""Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration: the window order, the vision tower
(window and full-attention blocks, block-local attention, static padding), the whole model causal and
bidirectional, position ids, scan / remat / jit, the presets' parameter counts, conversion both ways and
the tiny model the tool writes (training through the recipes: tests/test_packing.py, and Qwen3-VL's demo stage in
tests/test_qwen3_vl.py for a backbone whose decoder differs)."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_qwen2_vl import CASES, IMG, VE, VS, batch, hf_forward, image_run, reference_positions, rel_err  # noqa: E402

from mmret import models  # noqa: E402
from mmret.convert.checkpoint import convert_from_hf, load_model  # noqa: E402
from mmret.convert.export import export_to_hf  # noqa: E402
from mmret.models.qwen2_5_vl import Qwen2_5_VL, Qwen2_5_VLConfig  # noqa: E402
from mmret.models.qwen2_5_vl.windows import window_order  # noqa: E402
from mmret.models.qwen2_vl.position_ids import mrope_position_ids, vision_patch_positions  # noqa: E402

RTOL = 1e-4
WINDOW = 56  # pixels: 2 x 2 merged tokens (16 patches) a window, so the test images hold several
SHAPES = {  # name: (heads, kv_heads, mrope, tied, vision depth, full-attention blocks)
    "gqa-untied": (4, 2, (2, 3, 3), False, 3, [1]),
    "mha-tied": (4, 4, (4, 2, 2), True, 2, [0]),
}
LARGE = batch([[1, *image_run((1, 8, 12)), 2, 3, *image_run((1, 6, 10)), 4]], [(1, 8, 12), (1, 6, 10)])
ALL_CASES = {**CASES, "large_images": LARGE}


def hf_config(name: str) -> transformers.Qwen2_5_VLConfig:
    heads, kv, mrope, tied, depth, full = SHAPES[name]
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=200,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            rope_parameters={"rope_type": "default", "mrope_section": list(mrope), "rope_theta": 10000.0},
            max_position_embeddings=512,
        ),
        vision_config=dict(
            depth=depth,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            window_size=WINDOW,
            fullatt_block_indexes=full,
        ),
        image_token_id=IMG,
        video_token_id=151,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        tie_word_embeddings=tied,
    )


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    """A random transformers Qwen2.5-VL (every weight, norms too, moved well off its init) and its directory."""
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(request.param)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path


def hf_tower(hf, pixel_values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf.model.visual(torch.tensor(pixel_values), grid_thw=torch.tensor(grid)).pooler_output.numpy()


def ones(x: np.ndarray) -> np.ndarray:
    return np.ones(x.shape)


# --- the window order ------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 4])
def test_window_order_is_hugging_faces(window: int) -> None:
    """Hugging Face's window index (merged tokens reordered window by window, windows cut from the grid padded
    to whole windows, empty ones dropped) and window lengths, against ours at the patch level; grids whose
    merged sides are and are not multiples of the window, with a frame-2 grid and padding patch rows."""
    from transformers.vision_utils import get_vision_window_index

    grid = np.array([(1, 8, 12), (1, 4, 4), (2, 6, 2), (1, 2, 10), (1, 16, 8)])
    patch, m = 14, 2
    index, cu = get_vision_window_index(
        torch.tensor(grid), spatial_merge_size=m, window_size=window * m * patch, patch_size=patch
    )
    n = int(np.prod(grid, axis=1).sum())
    padded = n + 12
    positions = vision_patch_positions(jnp.asarray(grid), padded, m)
    order, image, window_id = (np.asarray(a) for a in window_order(jnp.asarray(grid), positions, m, window))
    want = (index.numpy()[:, None] * m * m + np.arange(m * m)).reshape(-1)  # merged-token order -> patches
    np.testing.assert_array_equal(order[:n], want)
    np.testing.assert_array_equal(order[n:], np.arange(n, padded))  # padding rows last, in order
    assert (image[n:] == -1).all() and (np.diff(image[:n]) >= 0).all()
    lengths = np.bincount(window_id[:n])
    np.testing.assert_array_equal(np.cumsum(lengths), cu.numpy()[1:])
    assert len(np.unique(window_id[n:])) == 1 and window_id[n] not in window_id[:n]


# --- the vision tower and the whole model -----------------------------------------------------------


def test_vision_tower_matches_hf_and_its_windows_matter(pair) -> None:
    hf, path = pair
    b = LARGE
    ref = hf_tower(hf, b.pixel_values, b.grid)
    model = models.from_hf(path)
    assert isinstance(model, Qwen2_5_VL)
    got = np.asarray(model.visual(jnp.asarray(b.pixel_values), jnp.asarray(b.grid)))
    assert got.shape == ref.shape == (b.pixel_values.shape[0] // 4, 64)
    assert rel_err(got, ref, ones(ref)) < RTOL
    # All blocks attending to whole images is another model: the windows are really used.
    depth = model.cfg.vision.depth
    vision = model.cfg.vision
    full = models.from_hf(path)
    full.visual.full = tuple([True] * depth)
    assert vision.fullatt_block_indexes != tuple(range(depth))
    other = np.asarray(full.visual(jnp.asarray(b.pixel_values), jnp.asarray(b.grid)))
    assert rel_err(other, ref, ones(ref)) > 100 * RTOL


def test_block_local_attention_and_static_padding_match_hf(pair) -> None:
    """max_image_patches (full blocks attend within blocks of neighbouring patches), padding patch rows and
    a filler grid row (the processor's static batches), jitted: the images' features are unchanged."""
    hf, path = pair
    b = LARGE
    ref = hf_tower(hf, b.pixel_values, b.grid)
    model = models.from_hf(path, max_image_patches=96)  # the 8 x 12 image fills a block, the 6 x 10 straddles two
    pv = np.concatenate([b.pixel_values, np.zeros((40, b.pixel_values.shape[1]), np.float32)])
    grid = np.concatenate([b.grid, [(1, 2, 20)], np.zeros((1, 3), np.int64)])
    mask = np.array([1, 1, 0, 0])
    got = np.asarray(jax.jit(model.visual)(jnp.asarray(pv), jnp.asarray(grid), jnp.asarray(mask)))
    assert rel_err(got[: ref.shape[0]], ref, ones(ref)) < RTOL
    with pytest.raises(ValueError, match="more than max_image_patches=90"):
        models.from_hf(path, max_image_patches=90).visual(jnp.asarray(b.pixel_values), jnp.asarray(b.grid))


def test_last_hidden_state_and_logits_match_hf(pair) -> None:
    """Every case (text only, one and several images, large images holding several windows, right and left
    padding); the second shape on the cases that differ most."""
    hf, path = pair
    model = models.from_hf(path, with_lm_head=True)
    cases = ALL_CASES if path.name.startswith("gqa") else ["padded_batch", "large_images"]
    for case in cases:
        b = ALL_CASES[case]
        ref_h, ref_logits = hf_forward(hf, b)
        out = model(b.ids, b.mask, b.pixel_values, b.grid)
        assert rel_err(np.asarray(out.last_hidden_state), ref_h, b.mask) < RTOL, case
        assert rel_err(np.asarray(out.logits), ref_logits, b.mask) < RTOL, case


def test_bidirectional_matches_hf(pair) -> None:
    hf, path = pair
    b = ALL_CASES["left_padding"]
    ref_bi, _ = hf_forward(hf, b, causal=False)
    ref_causal, _ = hf_forward(hf, b)
    got = np.asarray(
        models.from_hf(path, attention="bidirectional")(b.ids, b.mask, b.pixel_values, b.grid).last_hidden_state
    )
    assert rel_err(got, ref_bi, b.mask) < RTOL
    assert rel_err(ref_causal, ref_bi, b.mask) > 100 * RTOL


def test_position_ids_match_hf_get_rope_index(pair) -> None:
    hf, _ = pair
    for case in [c for c in ALL_CASES if c != "text_only"]:
        b = ALL_CASES[case]
        ref = reference_positions(hf, b)
        valid = np.broadcast_to(b.mask.astype(bool)[None], ref.shape)
        got = np.asarray(mrope_position_ids(b.ids, b.mask, b.grid, image_token_id=IMG))
        np.testing.assert_array_equal(got[valid], ref[valid], err_msg=case)


def test_gradients_through_the_window_and_full_blocks_agree_scanned_and_looped(pair) -> None:
    """Under scan a block picks window or whole-image attention with ``lax.cond`` on a traced flag; looped, in
    Python: the gradients of the tower's parameters and inputs agree (the branches differentiate alike)."""
    from flax import nnx

    _, path = pair
    b = LARGE

    def grads(model):
        graphdef, params = nnx.split(model.visual, nnx.Param)

        def loss(p, pv):
            return jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(pv, jnp.asarray(b.grid))) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(b.pixel_values))

    (p_scan, x_scan), (p_loop, x_loop) = grads(models.from_hf(path)), grads(models.from_hf(path, scan_layers=False))
    np.testing.assert_allclose(np.asarray(x_scan), np.asarray(x_loop), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(x_scan).max()) > 0
    qkv_scan = np.asarray(p_scan["blocks"]["layers"]["attn"]["qkv"]["kernel"][...])
    qkv_loop = np.stack(
        [np.asarray(p_loop["blocks"]["layers"][i]["attn"]["qkv"]["kernel"][...]) for i in range(len(qkv_scan))]
    )
    np.testing.assert_allclose(qkv_scan, qkv_loop, rtol=1e-4, atol=1e-6)


def test_scan_loop_remat_and_jit_agree(pair) -> None:
    _, path = pair
    b = ALL_CASES["padded_batch"]
    base = np.asarray(models.from_hf(path, scan_layers=True)(b.ids, b.mask, b.pixel_values, b.grid).last_hidden_state)
    from flax import nnx

    for options in (
        dict(scan_layers=False),
        dict(scan_layers=True, remat="dots"),
        dict(scan_layers=False, remat="full"),
    ):
        graphdef, state = nnx.split(models.from_hf(path, **options))
        got = jax.jit(lambda s, *a, g=graphdef: nnx.merge(g, s)(*a).last_hidden_state)(
            state, b.ids, b.mask, b.pixel_values, b.grid
        )
        assert rel_err(np.asarray(got), base, b.mask) < 1e-5, options


@pytest.mark.parametrize("preset", ["qwen2.5vl-3b", "qwen2.5vl-7b"])
def test_param_count_equals_hf_on_meta_device(preset: str) -> None:
    hf_cfg = models.preset_config(preset)
    with torch.device("meta"):
        hf = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**hf_cfg))
    expected = sum(p.numel() for p in hf.parameters())
    spec = models.find_preset(preset)
    assert spec is models.get("qwen2_5_vl")
    ours = spec.abstract(spec.config(hf_cfg, with_lm_head=True))
    from mmret.models.params import count_params

    assert count_params(ours) == expected
    approx = {"qwen2.5vl-3b": 3.75e9, "qwen2.5vl-7b": 8.29e9}[preset]  # the model cards' sizes
    assert abs(expected - approx) / approx < 0.01


def test_config_errors_name_the_key() -> None:
    hf = models.preset_config("qwen2.5vl-tiny")
    hf["vision_config"]["fullatt_block_indexes"] = [5]
    with pytest.raises(ValueError, match=r"fullatt_block_indexes \[5\]"):
        Qwen2_5_VLConfig.from_hf_dict(hf)
    hf = models.preset_config("qwen2.5vl-tiny")
    hf["vision_config"]["window_size"] = 20
    with pytest.raises(ValueError, match="window_size=20"):
        Qwen2_5_VLConfig.from_hf_dict(hf)
    with pytest.raises(ValueError, match="only 'qwen2_5_vl'"):
        Qwen2_5_VLConfig.from_hf_dict(models.preset_config("tiny"))


# --- conversion both ways and the tiny model -------------------------------------------------------


def test_conversion_round_trips_bitwise_and_exports_load_in_transformers(pair, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    hf, path = pair
    ckpt = convert_from_hf(path, tmp_path / "ckpt")
    out = export_to_hf(ckpt, tmp_path / "hf")
    a, b = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    again, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs, ours = hf.state_dict(), again.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    # The checkpoint (stored stacked) loads as the same model, here unstacked.
    b_ = ALL_CASES["one_image"]
    ref = np.asarray(
        models.from_hf(path, scan_layers=False)(b_.ids, b_.mask, b_.pixel_values, b_.grid).last_hidden_state
    )
    got = load_model(ckpt, scan_layers=False)
    assert isinstance(got, Qwen2_5_VL)
    np.testing.assert_array_equal(np.asarray(got(b_.ids, b_.mask, b_.pixel_values, b_.grid).last_hidden_state), ref)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """``tools/make_tiny_model.py --family qwen2_5_vl``'s directory."""
    out = tmp_path_factory.mktemp("tiny") / "m"
    assert helpers.load_tool("make_tiny_model").main(["--out", str(out), "--family", "qwen2_5_vl"]) == 0
    return out


def test_make_tiny_model_writes_a_qwen2_5_vl_directory(tiny_dir: Path) -> None:
    tmp_path = tiny_dir.parent
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["vision_config"]["window_size"] == WINDOW
    hf, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert models.backbone_of(tmp_path / "m") is models.get("qwen2_5_vl")
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        assert json.loads((tmp_path / "m" / name).read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    # Text through the real tokenizer, an image through the image processor: our model equals transformers'.
    from PIL import Image

    from mmret.data.processor import Processor

    proc = Processor(tmp_path / "m")
    assert proc.backbone is models.get("qwen2_5_vl")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (140, 196, 3), np.uint8))
    example = proc("a photo of", image, instruction="Find the image.")
    batch_ = proc.collate([example], max_length=example.length + 3, max_patches=example.num_patches + 8)
    ids, mask = np.asarray(batch_["input_ids"]), np.asarray(batch_["attention_mask"])
    with torch.no_grad():
        ref = (
            hf(
                input_ids=torch.tensor(ids).long(),
                attention_mask=torch.tensor(mask).long(),
                pixel_values=torch.tensor(np.asarray(batch_["pixel_values"])[: example.num_patches]),
                image_grid_thw=torch.tensor(np.asarray(batch_["image_grid_thw"])[:1]).long(),
                mm_token_type_ids=torch.tensor((ids == config["image_token_id"]).astype(np.int64)),
                output_hidden_states=True,
            )
            .hidden_states[-1]
            .numpy()
        )
    got = models.from_hf(tmp_path / "m")(
        ids, mask, batch_["pixel_values"], batch_["image_grid_thw"], image_mask=batch_["image_mask"]
    )
    assert rel_err(np.asarray(got.last_hidden_state), ref, mask) < RTOL
