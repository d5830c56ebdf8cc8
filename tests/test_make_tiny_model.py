"""tools/make_tiny_model.py and the data it writes: presets, the offline Qwen2 tokenizer, the processor."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import load_tool  # noqa: E402

from mmret.models.qwen2_vl import processor_files as pf  # noqa: E402
from mmret.models.qwen2_vl.presets import PRESETS, hf_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
IMAGE_PAD_ID = 151655


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return load_tool("make_tiny_model")


@pytest.fixture(scope="module")
def tiny_dir(tool: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    assert tool.main(["--out", str(out), "--preset", "tiny", "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def _image(h: int = 60, w: int = 90) -> Any:
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# --- (1) the tokenizer ---------------------------------------------------------------------------


def test_tokenizer_known_ids(tokenizer: Any) -> None:
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    for token, token_id in pf.SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert tokenizer.decode([token_id]) == token
    assert len(tokenizer) == 151657
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None
    # Special tokens in text are single tokens, not split into pieces.
    ids = tokenizer("a<|vision_start|><|image_pad|><|vision_end|>b")["input_ids"]
    assert ids[1:4] == [151652, 151655, 151653]


ROUND_TRIP = [
    "Hello, world!",
    "line one\nline two\r\n\n\ttabbed   spaces  ",
    "digits 0123456789 and 3.14159, 1e-6",
    "naïve café Ümlaut — “quotes” 日本語のテキスト Здравствуй мир مرحبا",
    "emoji 🎉🚀👩‍👩‍👧 and combining e\u0301",  # NFC: e + U+0301 -> é
    "I'm we'll they've CAN'T it's",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip_and_matches_tiktoken(tokenizer: Any, text: str) -> None:
    import unicodedata

    import tiktoken

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    # Same ids as tiktoken on the same ranks and regex (the Qwen reference implementation).
    enc = tiktoken.Encoding(
        "qwen2-test",
        pat_str=pf.QWEN2_PRETOKENIZE_REGEX,
        mergeable_ranks=_ranks(),
        special_tokens={},
    )
    assert ids == enc.encode(unicodedata.normalize("NFC", text))


_RANKS: dict[bytes, int] = {}


def _ranks() -> dict[bytes, int]:
    if not _RANKS:
        _RANKS.update(pf.load_mergeable_ranks())
    return _RANKS


def test_tokenizer_matches_tiktoken_on_source_code(tokenizer: Any) -> None:
    import tiktoken

    enc = tiktoken.Encoding(
        "qwen2-test", pat_str=pf.QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=_ranks(), special_tokens={}
    )
    text = (REPO / "mmret" / "models" / "qwen2_vl" / "processor_files.py").read_text()
    for token in pf.SPECIAL_TOKENS:  # tiktoken here has no special tokens
        text = text.replace(token, "")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == enc.encode(text)
    assert tokenizer.decode(ids) == text


def test_chat_template(tokenizer: Any) -> None:
    assert pf.DEFAULT_SYSTEM_PROMPT in pf.CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == (EXPECTED_PROMPT)
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "Yes."},
    ]
    assert tokenizer.apply_chat_template(convo, tokenize=False, add_vision_id=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Same?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
    )


# --- (2) the model directory loads ---------------------------------------------------------------


def test_directory_contents(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
    } <= names
    assert not any(n.startswith(".") for n in os.listdir(tiny_dir.parent)), "temporary dir left behind"
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056)
    assert (pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]) == (14, 2, 2)
    assert json.loads((tiny_dir / "config.json").read_text()) == {**hf_config("tiny"), "torch_dtype": "float32"}


def test_safetensors_hub_layout(tiny_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert {
        "visual.patch_embed.proj.weight",
        "visual.blocks.1.attn.qkv.weight",
        "visual.merger.mlp.2.weight",
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.bias",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    } <= keys
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)
    assert "lm_head.weight" not in keys  # tied to model.embed_tokens.weight in the tiny preset


def test_model_loads_and_runs(tiny_dir: Path) -> None:
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.float32
    text_cfg = model.config.text_config
    assert (text_cfg.hidden_size, text_cfg.num_hidden_layers, text_cfg.vocab_size) == (64, 2, 151936)
    assert text_cfg.rope_parameters["mrope_section"] == [2, 3, 3]
    assert model.config.vision_config.embed_dim == 32
    processor = pf.load_processor(tiny_dir)
    inputs = processor(text=[EXPECTED_PROMPT], images=[_image()], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 151936)
    assert torch.isfinite(logits).all()


def _check_processor_output(processor: Any) -> dict[str, Any]:
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == EXPECTED_PROMPT
    out = processor(text=[prompt], images=[_image()], return_tensors="np")
    grid = np.asarray(out["image_grid_thw"])
    n_patches = int(grid.prod())
    assert grid.tolist() == [[1, 4, 6]]  # 60x90 -> smart-resized to 56x84 -> 4x6 patches of 14
    assert np.asarray(out["pixel_values"]).shape == (n_patches, 1176)  # 3 * 2 * 14 * 14
    ids = np.asarray(out["input_ids"])[0]
    assert int((ids == IMAGE_PAD_ID).sum()) == n_patches // 4
    assert (np.asarray(out["mm_token_type_ids"])[0] == (ids == IMAGE_PAD_ID)).all()
    return out


def test_processor_without_torchvision(tiny_dir: Path) -> None:
    image_processor = transformers.AutoImageProcessor.from_pretrained(tiny_dir)
    assert type(image_processor).__name__ in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    _check_processor_output(pf.ImageTextProcessor(image_processor, tok))
    if not HAS_TORCHVISION:
        assert isinstance(pf.load_processor(tiny_dir), pf.ImageTextProcessor)


@pytest.mark.xfail(
    not HAS_TORCHVISION,
    raises=ImportError,
    strict=True,
    reason="transformers 5.23: Qwen2VLProcessor always builds its torchvision-only video processor",
)
def test_auto_processor(tiny_dir: Path) -> None:
    processor = transformers.AutoProcessor.from_pretrained(tiny_dir)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    out = _check_processor_output(processor)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    fallback = pf.ImageTextProcessor(processor.image_processor, tok)
    ours = fallback(text=[EXPECTED_PROMPT], images=[_image()], return_tensors="np")
    for key in ("input_ids", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(out[key]), err_msg=key)


# --- (3) seeds and the CLI -----------------------------------------------------------------------


def test_seed_determinism(tool: ModuleType, tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    # The family given or not (qwen2_vl is the default and the tiny preset's), the same bytes.
    assert tool.main(["--out", str(tmp_path / "same"), "--family", "qwen2_vl", "--seed", "0"]) == 0
    assert tool.main(["--out", str(tmp_path / "other"), "--seed", "1"]) == 0
    base = (tiny_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "same" / "model.safetensors").read_bytes() == base
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (tmp_path / "same" / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    a = load_file(str(tiny_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert a.keys() == b.keys()
    w0, w1 = a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"]
    assert w0.shape == w1.shape and not np.array_equal(w0, w1)
    assert 0.015 < float(w0.std()) < 0.025  # initializer_range 0.02


def test_cli_refuses_to_overwrite(tool: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert tool.main(["--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    assert tool.main(["--out", str(tmp_path / "file")]) == 2
    with pytest.raises(SystemExit) as exc:
        tool.main(["--out", str(tmp_path / "big"), "--preset", "qwen2vl-2b"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        tool.main(["--out", str(tmp_path / "x"), "--family", "llava"])
    assert exc.value.code == 2
    assert tool.main(["--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "file"]  # no temporary dirs left


def test_family_and_preset_resolution(tool: ModuleType) -> None:
    from mmret import models

    qwen = models.get("qwen2_vl")
    assert tool.resolve(None, None) == (qwen, "tiny")  # the default family's first test preset
    assert tool.resolve(None, "small") == (qwen, "small")  # the family that defines the preset
    assert tool.resolve("qwen2_vl", None) == (qwen, "tiny")
    assert tool.materialisable_presets() == {
        "tiny": "qwen2_vl",
        "small": "qwen2_vl",
        "qwen2.5vl-tiny": "qwen2_5_vl",
        "qwen2.5vl-small": "qwen2_5_vl",
        "qwen3vl-tiny": "qwen3_vl",
        "qwen3vl-small": "qwen3_vl",
    }
    q3 = models.get("qwen3_vl")
    assert tool.resolve(None, "qwen3vl-small") == (q3, "qwen3vl-small") and tool.resolve("qwen3_vl", None) == (
        q3,
        "qwen3vl-tiny",
    )
    with pytest.raises(tool.UsageError, match="--preset must be one of"):
        tool.resolve("qwen3_vl", "tiny")  # another family's preset
    for family, preset, message in (("llava", None, "--family 'llava'"), (None, "qwen2vl-7b", "--preset 'qwen2vl-7b'")):
        with pytest.raises(tool.UsageError, match=message):
            tool.resolve(family, preset)


# --- (4) presets -----------------------------------------------------------------------------------

REAL = {
    "qwen2vl-2b": dict(
        hidden=1536, inter=8960, layers=28, heads=12, kv=2, vocab=151936, tied=True, params=2_208_985_600
    ),
    "qwen2vl-7b": dict(
        hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064, tied=False, params=8_291_375_616
    ),
}


@pytest.mark.parametrize("preset", sorted(REAL))
def test_real_presets(preset: str) -> None:
    want = REAL[preset]
    cfg = transformers.Qwen2VLConfig(**hf_config(preset))
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (want["hidden"], want["inter"], 28)
    assert (t.num_attention_heads, t.num_key_value_heads) == (want["heads"], want["kv"])
    assert t.vocab_size == want["vocab"]
    assert cfg.tie_word_embeddings is want["tied"]
    assert (t.rms_norm_eps, t.max_position_embeddings, t.hidden_act) == (1e-6, 32768, "silu")
    assert t.rope_parameters["rope_theta"] == 1e6
    assert t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_ratio) == (32, 1280, 16, 4)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.in_channels) == (14, 2, 2, 3)
    assert (v.hidden_act, v.hidden_size) == ("quick_gelu", want["hidden"])
    assert (cfg.image_token_id, cfg.video_token_id) == (151655, 151656)
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (151652, 151653)
    assert (t.bos_token_id, t.eos_token_id) == (151643, 151645)
    # Shapes only (meta device): the totals of the released checkpoints (2.21B and 8.29B parameters).
    with torch.device("meta"):
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    assert sum(p.numel() for p in model.parameters()) == want["params"]


def test_all_presets_consistent() -> None:
    assert set(PRESETS) == {"tiny", "small", "qwen2vl-2b", "qwen2vl-7b"}
    for name in PRESETS:
        d = hf_config(name)
        assert d["rope_scaling"]["mrope_section"] == d["rope_parameters"]["mrope_section"]
        assert 2 * sum(d["rope_parameters"]["mrope_section"]) == d["hidden_size"] // d["num_attention_heads"]
        assert d["vision_config"]["hidden_size"] == d["hidden_size"]
        assert d["vision_config"]["in_chans"] == d["vision_config"]["in_channels"] == 3
        assert hf_config(name) == d and hf_config(name) is not d  # fresh copies
    tiny, small = hf_config("tiny"), hf_config("small")
    assert (tiny["hidden_size"], tiny["vision_config"]["embed_dim"], tiny["vocab_size"]) == (64, 32, 151936)
    assert (small["hidden_size"], small["vision_config"]["embed_dim"], small["vocab_size"]) == (256, 128, 151936)
    with pytest.raises(KeyError):
        hf_config("qwen2vl-72b")


def test_presets_module_is_pure_python() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('p', {str(REPO / 'mmret/models/qwen2_vl/presets.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m.hf_config('tiny')['hidden_size'] == 64\n"
        "heavy = {'torch', 'transformers', 'jax', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
