"""Qwen3-VL (dense) against transformers' Qwen3VLForConditionalGeneration: the interleaved M-RoPE layout, the
position-embedding taps, the vision tower and its DeepStack features, the whole model causal and
bidirectional, position ids, scan / remat / jit, the presets' parameter counts, conversion both ways and the
tiny model the tool writes (through the processor, and trained by the demo stage)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_qwen2_vl import CASES as QWEN2_VL_CASES  # noqa: E402
from test_qwen2_vl import IMG, VE, VS, Batch, batch, hf_forward, image_run, reference_positions, rel_err  # noqa: E402

from mmret import models  # noqa: E402
from mmret.convert.checkpoint import convert_from_hf, load_model  # noqa: E402
from mmret.convert.export import export_to_hf  # noqa: E402
from mmret.models.qwen2_vl.position_ids import mrope_position_ids, vision_patch_positions  # noqa: E402
from mmret.models.qwen3_vl import Qwen3VL, Qwen3VLConfig  # noqa: E402
from mmret.models.qwen3_vl.position_embedding import interpolation_taps  # noqa: E402
from mmret.models.qwen3_vl.rope import interleaved_axes  # noqa: E402

RTOL = 1e-4
PATCH_DIM = 3 * 2 * 16 * 16
SHAPES = {  # name: (heads, kv_heads, head_dim, mrope, tied, vision depth, deepstack blocks, decoder layers)
    "gqa-untied": (4, 2, 16, (2, 3, 3), False, 3, [0, 2], 3),
    "mha-tied": (4, 4, 24, (4, 4, 4), True, 2, [1], 2),
}


def with_patches(b: Batch, seed: int = 0) -> Batch:
    """The Qwen2-VL test batch with Qwen3-VL's patch rows (16 x 16 pixels)."""
    if b.pixel_values is None:
        return b
    pv = np.random.default_rng(seed).standard_normal((b.pixel_values.shape[0], PATCH_DIM)).astype(np.float32)
    return Batch(b.ids, b.mask, pv, b.grid)


CASES = {
    **{k: with_patches(b) for k, b in QWEN2_VL_CASES.items()},
    "large_image": with_patches(batch([[1, *image_run((1, 10, 14)), 2, 3]], [(1, 10, 14)])),  # grid > the table
}


def hf_config(name: str) -> transformers.Qwen3VLConfig:
    heads, kv, head_dim, mrope, tied, depth, deepstack, layers = SHAPES[name]
    return transformers.Qwen3VLConfig(
        text_config=dict(
            vocab_size=200,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": list(mrope),
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
            },
            max_position_embeddings=512,
        ),
        vision_config=dict(
            depth=depth,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=36,  # a 6 x 6 table
            deepstack_visual_indexes=deepstack,
        ),
        image_token_id=IMG,
        video_token_id=151,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        tie_word_embeddings=tied,
    )


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    """A random transformers Qwen3-VL (every weight, norms too, moved well off its init) and its directory."""
    torch.manual_seed(0)
    hf = transformers.Qwen3VLForConditionalGeneration(hf_config(request.param)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path


def ones(x: np.ndarray) -> np.ndarray:
    return np.ones(x.shape)


# --- the pieces, against transformers' own functions -------------------------------------------------


@pytest.mark.parametrize("section", [(24, 20, 20), (2, 3, 3), (4, 4, 4)])
def test_interleaved_axes_are_transformers_recomposition(section) -> None:
    """transformers' ``recomposition_frequencies`` fed frequencies that say which axis they came from."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    half = sum(section)
    freq = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 1, 1, half).clone()
    rotary = Qwen3VLTextRotaryEmbedding.__new__(Qwen3VLTextRotaryEmbedding)
    rotary.mrope_section = list(section)
    got = Qwen3VLTextRotaryEmbedding.recomposition_frequencies(rotary, freq)[0, 0, :half].numpy()
    np.testing.assert_array_equal(interleaved_axes(half, section), got.astype(np.int32))
    assert len(set(interleaved_axes(half, section))) == 3


def test_position_embedding_taps_are_transformers_interpolation() -> None:
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    grid = np.array([(1, 4, 6), (1, 10, 14), (1, 2, 2), (1, 16, 4)])
    side = 6
    ref_i, ref_w = get_vision_interpolation_indices_and_weights(
        torch.tensor(grid), side, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    n = int(np.prod(grid, axis=1).sum())
    indices, weights = interpolation_taps(jnp.asarray(grid), vision_patch_positions(jnp.asarray(grid), n, 2), side)
    np.testing.assert_array_equal(np.asarray(indices), ref_i.numpy())
    np.testing.assert_allclose(np.asarray(weights), ref_w.numpy(), atol=1e-6)


# --- the vision tower and the whole model -------------------------------------------------------------


def test_vision_tower_and_deepstack_match_hf(pair) -> None:
    hf, path = pair
    b = CASES["several_images"]
    with torch.no_grad():
        out = hf.model.visual(torch.tensor(b.pixel_values), grid_thw=torch.tensor(b.grid))
    model = models.from_hf(path)
    assert isinstance(model, Qwen3VL)
    feats, deep = model.visual.with_deepstack(jnp.asarray(b.pixel_values), jnp.asarray(b.grid))
    ref = out.pooler_output.numpy()
    assert rel_err(np.asarray(feats), ref, ones(ref)) < RTOL
    assert deep.shape[0] == len(out.deepstack_features) == len(model.cfg.vision.deepstack_visual_indexes)
    for got, want in zip(np.asarray(deep), out.deepstack_features, strict=True):
        assert rel_err(got, want.numpy(), ones(want.numpy())) < RTOL
    # Block-local attention, padding patch rows and a filler grid row change nothing, jitted.
    blocked = models.from_hf(path, max_image_patches=24)
    pv = np.concatenate([b.pixel_values, np.zeros((40, PATCH_DIM), np.float32)])
    grid = np.concatenate([b.grid, [(1, 2, 20)]])
    mask = np.array([1, 1, 1, 0])
    got = jax.jit(lambda p, g, m: blocked.visual.with_deepstack(p, g, m))(pv, grid, mask)
    assert rel_err(np.asarray(got[0])[: ref.shape[0]], ref, ones(ref)) < RTOL
    want = out.deepstack_features[-1].numpy()
    assert rel_err(np.asarray(got[1][-1])[: ref.shape[0]], want, ones(want)) < RTOL


def test_last_hidden_state_and_logits_match_hf(pair) -> None:
    hf, path = pair
    model = models.from_hf(path, with_lm_head=True)
    cases = CASES if path.name.startswith("gqa") else ["padded_batch", "large_image"]
    for case in cases:
        b = CASES[case]
        ref_h, ref_logits = hf_forward(hf, b)
        out = model(b.ids, b.mask, b.pixel_values, b.grid)
        assert rel_err(np.asarray(out.last_hidden_state), ref_h, b.mask) < RTOL, case
        assert rel_err(np.asarray(out.logits), ref_logits, b.mask) < RTOL, case
    # DeepStack matters: without its features the image rows differ.
    b = CASES["one_image"]
    ref_h, _ = hf_forward(hf, b)
    plain = models.from_hf(path)
    plain.visual.cfg = dataclasses.replace(plain.visual.cfg, deepstack_visual_indexes=())
    got = np.asarray(plain(b.ids, b.mask, b.pixel_values, b.grid).last_hidden_state)
    assert rel_err(got, ref_h, b.mask) > 100 * RTOL


def test_bidirectional_matches_hf(pair) -> None:
    hf, path = pair
    b = CASES["left_padding"]
    ref_bi, _ = hf_forward(hf, b, causal=False)
    ref_causal, _ = hf_forward(hf, b)
    model = models.from_hf(path, attention="bidirectional")
    got = np.asarray(model(b.ids, b.mask, b.pixel_values, b.grid).last_hidden_state)
    assert rel_err(got, ref_bi, b.mask) < RTOL
    assert rel_err(ref_causal, ref_bi, b.mask) > 100 * RTOL


def test_position_ids_match_hf_get_rope_index(pair) -> None:
    hf, _ = pair
    for case in [c for c in CASES if c != "text_only"]:
        b = CASES[case]
        ref = reference_positions(hf, b)
        valid = np.broadcast_to(b.mask.astype(bool)[None], ref.shape)
        got = np.asarray(mrope_position_ids(b.ids, b.mask, b.grid, image_token_id=IMG))
        np.testing.assert_array_equal(got[valid], ref[valid], err_msg=case)


def test_scan_loop_remat_and_jit_agree(pair) -> None:
    from flax import nnx

    _, path = pair
    b = CASES["padded_batch"]
    base = np.asarray(models.from_hf(path, scan_layers=True)(b.ids, b.mask, b.pixel_values, b.grid).last_hidden_state)
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


@pytest.mark.parametrize("preset", ["qwen3vl-2b", "qwen3vl-4b", "qwen3vl-8b"])
def test_param_count_equals_hf_on_meta_device(preset: str) -> None:
    hf_cfg = models.preset_config(preset)
    with torch.device("meta"):
        hf = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**hf_cfg))
    expected = sum(p.numel() for p in hf.parameters())
    spec = models.find_preset(preset)
    assert spec is models.get("qwen3_vl")
    from mmret.models.params import count_params

    assert count_params(spec.abstract(spec.config(hf_cfg, with_lm_head=True))) == expected
    approx = {"qwen3vl-2b": 2.13e9, "qwen3vl-4b": 4.44e9, "qwen3vl-8b": 8.77e9}[preset]  # the model cards' sizes
    assert abs(expected - approx) / approx < 0.01, expected


def test_config_errors_name_the_key() -> None:
    hf = models.preset_config("qwen3vl-tiny")
    hf["vision_config"]["deepstack_visual_indexes"] = [2, 1]
    with pytest.raises(ValueError, match=r"deepstack_visual_indexes \[2, 1\]"):
        Qwen3VLConfig.from_hf_dict(hf)
    hf = models.preset_config("qwen3vl-tiny")
    hf["vision_config"]["num_position_embeddings"] = 50
    with pytest.raises(ValueError, match="num_position_embeddings=50"):
        Qwen3VLConfig.from_hf_dict(hf)
    hf = models.preset_config("qwen3vl-tiny")
    hf["text_config"]["rope_parameters"]["mrope_interleaved"] = False
    with pytest.raises(ValueError, match="mrope_interleaved"):
        Qwen3VLConfig.from_hf_dict(hf)


# --- conversion both ways and the tiny model ------------------------------------------------------------


def test_conversion_round_trips_bitwise_and_exports_load_in_transformers(pair, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    hf, path = pair
    ckpt = convert_from_hf(path, tmp_path / "ckpt")
    out = export_to_hf(ckpt, tmp_path / "hf")
    a, b = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    again, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs, ours = hf.state_dict(), again.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    c = CASES["one_image"]
    ref = models.from_hf(path, scan_layers=False)(c.ids, c.mask, c.pixel_values, c.grid).last_hidden_state
    got = load_model(ckpt, scan_layers=False)  # stored stacked, loaded unstacked
    assert isinstance(got, Qwen3VL)
    np.testing.assert_array_equal(
        np.asarray(got(c.ids, c.mask, c.pixel_values, c.grid).last_hidden_state), np.asarray(ref)
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """``tools/make_tiny_model.py --family qwen3_vl``'s directory."""
    out = tmp_path_factory.mktemp("tiny") / "m"
    assert helpers.load_tool("make_tiny_model").main(["--out", str(out), "--family", "qwen3_vl"]) == 0
    return out


def test_make_tiny_model_writes_a_qwen3_vl_directory(tiny_dir: Path) -> None:
    from PIL import Image

    from mmret.data.processor import Processor, ProcessorConfig

    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["vision_config"]["patch_size"] == 16
    hf, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert models.backbone_of(tiny_dir) is models.get("qwen3_vl")
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Qwen3VLProcessor" and pre["patch_size"] == 16 and pre["image_mean"] == [0.5] * 3
    # The image processor transformers builds from these files patches as ours does (32 x 32 pixels a token).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 230, 3), np.uint8))
    proc = Processor(tiny_dir, ProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 32 * 32))
    theirs = transformers.AutoImageProcessor.from_pretrained(tiny_dir, min_pixels=32 * 32, max_pixels=64 * 32 * 32)
    want = theirs(images=[image], return_tensors="np")
    got_pv, got_grid = proc.patcher(image)
    np.testing.assert_array_equal(got_grid, want["image_grid_thw"])
    np.testing.assert_allclose(got_pv, want["pixel_values"], atol=1e-6)
    # Text and the image through our processor: our model equals transformers'.
    example = proc("a photo of", image, instruction="Find the image.")
    b = proc.collate([example], max_length=example.length + 3, max_patches=example.num_patches + 8)
    ids, mask = np.asarray(b["input_ids"]), np.asarray(b["attention_mask"])
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids).long(),
            attention_mask=torch.tensor(mask).long(),
            pixel_values=torch.tensor(np.asarray(b["pixel_values"])[: example.num_patches]),
            image_grid_thw=torch.tensor(np.asarray(b["image_grid_thw"])[:1]).long(),
            mm_token_type_ids=torch.tensor((ids == config["image_token_id"]).astype(np.int64)),
            output_hidden_states=True,
        ).hidden_states[-1]
    got = models.from_hf(tiny_dir)(ids, mask, b["pixel_values"], b["image_grid_thw"], image_mask=b["image_mask"])
    assert rel_err(np.asarray(got.last_hidden_state), ref.numpy(), mask) < RTOL


#: Conversations and what Qwen/Qwen3-VL-*-Instruct's released chat template renders for them, written from its
#: rules: a system turn only when the conversation opens with one (U-MARVEL's Qwen3-VL reranker collator,
#: ``collators/mbeir_rerank_qwen3_vl.py``: "qwen3 has no system prompt", so its label masking starts at token 0),
#: an image as the vision triplet, "Picture N: " before it with ``add_vision_id``.
RELEASED_RENDERINGS = [
    (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        dict(add_generation_prompt=True),
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        ],
        dict(add_vision_id=True),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|>"
        "<|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>Same?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n",
    ),
]


def test_chat_template_adds_no_system_turn_and_prompts_render_as_it_does(tiny_dir: Path) -> None:
    """The tiny directory's chat template renders as the released Qwen3-VL one; mmret's prompt templates and
    reranker pairs on a Qwen3-VL directory render what that template renders (no system turn), token for
    token as transformers tokenises it, and the reranker trains U-MARVEL's Qwen3-VL labels."""
    from PIL import Image
    from test_reranker import IGNORE, hf_inputs, umarvel_messages

    from mmret.data.processor import Processor, ProcessorConfig
    from mmret.data.rerank_pairs import PairRenderer
    from mmret.data.rerank_prompts import UMARVEL
    from mmret.models.qwen2_vl import processor_files as pf

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    for messages, options, want in RELEASED_RENDERINGS:
        assert tokenizer.apply_chat_template(messages, tokenize=False, **options) == want

    def one_turn(user: str, has_image: bool) -> str:
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": user}]
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    pixels = dict(min_pixels=32 * 32, max_pixels=16 * 32 * 32)
    text, instruction = "a red bus", "Find the image."
    umarvel = Processor(tiny_dir, ProcessorConfig(**pixels))
    user = (
        f"<|object_ref_start|>{instruction}<|object_ref_end|> {text}\nSummarize above image and sentence in one word:"
    )
    assert umarvel.render(text, instruction=instruction, has_image=True) == one_turn(user, True) + "<|endoftext|>"
    last = Processor(tiny_dir, ProcessorConfig(template="last_token", **pixels))
    assert last.render(text, instruction=instruction, has_image=False) == one_turn(f"{instruction} {text}", False) + (
        "<|endoftext|>"
    )
    exact = Processor(tiny_dir, ProcessorConfig(template="umarvel_exact", **pixels))
    assert exact.render(text, instruction=instruction, has_image=True).startswith("<|im_start|>user\n")
    assert umarvel.template.system_prompt is None  # what an export writes into mmret_embedding.json

    hf = pf.ImageTextProcessor(transformers.AutoImageProcessor.from_pretrained(tiny_dir, **pixels), tokenizer)
    renderer = PairRenderer(umarvel, UMARVEL)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    for q, qi, c, ci in [
        ("Identify the landmark.", picture, "The Eiffel Tower.", picture),
        ("Capital?", None, "Paris.", None),
    ]:
        ours = renderer(q, qi, c, ci)
        ref = hf_inputs(hf, umarvel_messages(q, qi, c, ci), generation=True)["input_ids"][0]
        np.testing.assert_array_equal(ours.example.input_ids, ref)
        ours = renderer(q, qi, c, ci, answer=True)
        ref = hf_inputs(hf, umarvel_messages(q, qi, c, ci, "Yes"), generation=False)["input_ids"][0]
        np.testing.assert_array_equal(ours.example.input_ids, ref)
        labels = ref.astype(np.int64).copy()  # U-MARVEL's Qwen3-VL collator: every user turn, from token 0
        starts = np.nonzero(ref == 151644)[0]
        for j in range(0, len(starts), 2):
            labels[starts[j] : starts[j + 1]] = IGNORE
        (positions,) = np.nonzero(labels[1:] != IGNORE)
        np.testing.assert_array_equal(ours.target_positions, positions)
        np.testing.assert_array_equal(ours.target_ids, ref[positions + 1])


def test_the_demo_stage_trains_a_qwen3_vl_through_the_entry_point(tiny_dir: Path, tiny_mbeir, tmp_path: Path) -> None:
    """U-MARVEL's M-BEIR demo stage (packed batches, GradCache, LoRA) with ``--config.model.hf_dir`` at the tiny
    Qwen3-VL (images of at least one 32 x 32 token, at most 64): it trains (its loss falls) and checkpoints."""
    steps = 4
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmret.launch",
            "--config=umarvel.py:mbeir_demo",
            f"--workdir={tmp_path / 'run'}",
            f"--config.model.hf_dir={tiny_dir}",
            f"--config.data.root={tiny_mbeir}",
            f"--config.data.processor.min_pixels={32 * 32}",
            f"--config.data.processor.max_pixels={64 * 32 * 32}",
            f"--config.optimizer.total_steps={steps}",
            "--config.log_every=1",
            "--config.eval.at_start=False",
            "--config.eval.at_end=False",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ, XLA_FLAGS=helpers.xla_flags(1)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [rec["loss"] for rec in records]
    assert len(losses) == steps and sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    assert (tmp_path / "run" / "checkpoints" / str(steps)).is_dir()
