"""Conversion hub safetensors <-> mmret orbax checkpoint <-> hub safetensors, on tiny random models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from mmret.atomic_dir import OutputExistsError  # noqa: E402
from mmret.convert import checkpoint  # noqa: E402
from mmret.convert.checkpoint import (  # noqa: E402
    convert_from_hf,
    hf_files_dir,
    load_model,
    read_info,
    restore_params,
    save_model,
    save_params,
)
from mmret.convert.export import export_to_hf, parse_size  # noqa: E402
from mmret.convert.hf import ConversionError  # noqa: E402
from mmret.models import qwen2_vl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "tools" / "convert_checkpoint.py"
IMAGE, VISION_START, VISION_END = 290, 292, 293
# Small files a hub directory carries besides the weights; arbitrary bytes (the converter copies them).
FAKE_FILES = {
    "tokenizer.json": b'{"fake": "tokenizer"}',
    "tokenizer_config.json": b'{"tokenizer_class": "Qwen2Tokenizer"}',
    "chat_template.jinja": "{{ messages }} \u00e9\n".encode(),
    "preprocessor_config.json": bytes(range(256)),
    "merges.txt": b"#version: 0.2\n\xff\xfe",
}


def _hf_config(tied: bool) -> transformers.Qwen2VLConfig:
    return transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            tie_word_embeddings=tied,
            bos_token_id=0,
            eos_token_id=1,
        ),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, in_channels=3),
        image_token_id=IMAGE,
        video_token_id=291,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=tied,
    )


def _make_hf_dir(path: Path, *, tied: bool, dtype: torch.dtype, seed: int) -> Path:
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(_hf_config(tied))
    with torch.no_grad():  # random everything (norms too), so a layout mistake cannot hide
        for name, p in model.named_parameters():
            is_norm = name.endswith("weight") and ("norm" in name or "ln_q" in name)
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if is_norm else 0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    for name, data in FAKE_FILES.items():
        (path / name).write_bytes(data)
    (path / "README.md").write_text("not a model file\n")
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    tied = _make_hf_dir(root / "tied_f32", tied=True, dtype=torch.float32, seed=0)
    untied = _make_hf_dir(root / "untied_bf16", tied=False, dtype=torch.bfloat16, seed=1)
    # A tied model whose file also holds lm_head.weight (as some hub uploads do).
    head = shutil.copytree(tied, root / "tied_with_head")
    tensors = load_file(head / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, head / "model.safetensors", metadata={"format": "pt"})
    return {"tied_f32": tied, "untied_bf16": untied, "tied_with_head": head}


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def _entries(parent: Path) -> set[str]:
    return set(os.listdir(parent))


@pytest.mark.parametrize("name", ["tied_f32", "untied_bf16", "tied_with_head"])
def test_round_trip_is_bitwise_equal(sources: dict[str, Path], tmp_path: Path, name: str) -> None:
    src = sources[name]
    ckpt = convert_from_hf(src, tmp_path / "ckpt")
    info = read_info(ckpt)
    assert info.dtype == ("bfloat16" if name == "untied_bf16" else "float32")  # source dtype kept
    assert info.scan_layers
    out = export_to_hf(ckpt, tmp_path / "hf")
    _assert_bitwise_equal(_tensors(src), _tensors(out))
    assert not (out / "model.safetensors.index.json").exists()
    for f in [*FAKE_FILES, "config.json", "generation_config.json"]:
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
        assert (hf_files_dir(ckpt) / f).read_bytes() == (src / f).read_bytes(), f
    assert not (out / "README.md").exists()  # only model / tokenizer / processor files travel
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]  # no temp dirs left


def test_sharded_export_loads_in_transformers(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["untied_bf16"]
    ckpt = convert_from_hf(src, tmp_path / "ckpt", scan_layers=False)
    out = export_to_hf(ckpt, tmp_path / "hf", max_shard_size="60KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    for f in shards:  # each file within the limit, or one tensor alone (the 75 KB patch embedding)
        tensors = load_file(f)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 60_000
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(src).values())
    _assert_bitwise_equal(_tensors(src), _tensors(out))

    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16
    reference = transformers.Qwen2VLForConditionalGeneration.from_pretrained(src)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # The sharded directory reads back; one shard gone is named.
    again = convert_from_hf(out, tmp_path / "again")
    first, second = restore_params(ckpt), restore_params(again, scan_layers=False)
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    shards[1].unlink()
    with pytest.raises(ConversionError, match=shards[1].name):
        convert_from_hf(out, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def test_tied_export_loads_in_transformers(sources: dict[str, Path], tmp_path: Path) -> None:
    out = export_to_hf(convert_from_hf(sources["tied_f32"], tmp_path / "ckpt"), tmp_path / "hf")
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = [[5, VISION_START, *[IMAGE] * 4, VISION_END, 7, 8, 9], [0, 0, 3, 4, 5, 6, 7, 8, 9, 10]]
    return dict(
        input_ids=np.array(ids, np.int32),
        attention_mask=np.array([[1] * 10, [0, 0] + [1] * 8], np.int32),
        pixel_values=rng.standard_normal((16, 1176)).astype(np.float32),
        image_grid_thw=np.array([[1, 4, 4]], np.int32),
    )


@pytest.mark.parametrize("stored_scan", [True, False])
def test_load_model_matches_from_hf_in_both_layouts(sources: dict[str, Path], tmp_path: Path, stored_scan: bool):
    src = sources["untied_bf16"]
    ckpt = convert_from_hf(src, tmp_path / "ckpt", scan_layers=stored_scan)
    inputs = _inputs()
    for scan in (True, False):
        ref = qwen2_vl.from_hf(src, dtype=jnp.float32, scan_layers=scan, with_lm_head=True)
        got = load_model(ckpt, dtype=jnp.float32, scan_layers=scan, with_lm_head=True)
        assert got.cfg.scan_layers == scan
        want, out = ref(**inputs), got(**inputs)
        np.testing.assert_array_equal(np.asarray(out.last_hidden_state), np.asarray(want.last_hidden_state))
        np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(want.logits))


def test_save_model_then_export_round_trips(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["untied_bf16"]
    ckpt = convert_from_hf(src, tmp_path / "ckpt")
    model = load_model(ckpt, dtype=jnp.bfloat16, scan_layers=False, with_lm_head=True)
    again = save_model(tmp_path / "again", model, hf_files_from=hf_files_dir(ckpt))
    assert not read_info(again).scan_layers
    _assert_bitwise_equal(_tensors(src), _tensors(export_to_hf(again, tmp_path / "hf")))

    # Without the untied head the export cannot be complete: an error names the parameter.
    params = restore_params(ckpt)
    del params[("lm_head", "kernel")]
    headless = save_params(tmp_path / "headless", params, scan_layers=True, hf_files_from=src)
    with pytest.raises(ConversionError, match=r"lm_head\.kernel"):
        export_to_hf(headless, tmp_path / "hf2")
    with pytest.raises(ConversionError, match=r"lm_head\.kernel"):
        load_model(headless, with_lm_head=True)
    assert not (tmp_path / "hf2").exists()


def test_dtype_override(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["untied_bf16"]
    ckpt = convert_from_hf(src, tmp_path / "ckpt", dtype="float32")
    assert read_info(ckpt).dtype == "float32"
    out = export_to_hf(ckpt, tmp_path / "hf")
    a, b = _tensors(src), _tensors(out)
    assert all(b[k].dtype == torch.float32 and torch.equal(b[k], a[k].float()) for k in a)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    back = export_to_hf(ckpt, tmp_path / "hf_bf16", dtype="bfloat16")
    _assert_bitwise_equal(a, _tensors(back))
    assert (back / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_chunked_arrays_and_grouped_restore(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = sources["untied_bf16"]
    whole = restore_params(convert_from_hf(src, tmp_path / "whole"))
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1000)  # many chunks per array
    monkeypatch.setattr(checkpoint, "RESTORE_GROUP_BYTES", 5000)  # many restore calls
    ckpt = convert_from_hf(src, tmp_path / "ckpt")
    parts = restore_params(ckpt)
    assert parts.keys() == whole.keys()
    assert all(parts[k].dtype == whole[k].dtype and np.array_equal(parts[k], whole[k]) for k in whole)
    _assert_bitwise_equal(_tensors(src), _tensors(export_to_hf(ckpt, tmp_path / "hf")))


def _missing_tensor(d: Path) -> str:
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"


def _wrong_shape(d: Path) -> str:
    tensors = load_file(d / "model.safetensors")
    tensors["visual.blocks.1.mlp.fc2.weight"] = torch.zeros(32, 63)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return r"'visual\.blocks\.1\.mlp\.fc2\.weight' has shape \[32, 63\], the config implies \[32, 64\]"


def _llava(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    return r"config\.json: unsupported architecture: model_type='llava'"


def _pickle_only(d: Path) -> str:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a pickle")
    return r"pytorch_model\.bin: pickle checkpoints are refused"


def _mixed_dtypes(d: Path) -> str:
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].half()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return r"mixed dtypes \['float16', 'float32'\]; choose one"


@pytest.mark.parametrize("corrupt", [_missing_tensor, _wrong_shape, _llava, _pickle_only, _mixed_dtypes])
def test_bad_input_is_named_and_leaves_nothing(sources: dict[str, Path], tmp_path: Path, corrupt) -> None:
    bad = shutil.copytree(sources["tied_f32"], tmp_path / "src")
    pattern = corrupt(bad)
    before = _entries(tmp_path)
    with pytest.raises(ConversionError, match=pattern):
        convert_from_hf(bad, tmp_path / "ckpt")
    assert _entries(tmp_path) == before


def test_output_is_never_clobbered(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        convert_from_hf(sources["tied_f32"], out)
    assert os.listdir(out) == ["keep.txt"]
    convert_from_hf(sources["tied_f32"], out, force=True)
    assert not (out / "keep.txt").exists() and read_info(out).scan_layers
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    with pytest.raises(OutputExistsError, match="not empty"):
        export_to_hf(out, sources["tied_f32"])  # an existing model directory
    with pytest.raises(ConversionError, match="bad size"):
        export_to_hf(out, tmp_path / "hf", max_shard_size="5 parsecs")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2**31 and parse_size(123) == 123


def test_cli(sources: dict[str, Path], tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=120)

    ok = cli("from_hf", "--hf_dir", str(sources["untied_bf16"]), "--out", str(tmp_path / "ckpt"))
    assert ok.returncode == 0, ok.stderr
    # One progress bar over the parameters (mmret.progress): its final line counts them all and names the write.
    n = len(restore_params(tmp_path / "ckpt"))
    last = [line for line in ok.stdout.splitlines() if line.startswith("from_hf:")][-1]
    assert "100%" in last and f"{n}/{n} " in last and f"tensor/s, writing {tmp_path / 'ckpt'}]" in last, ok.stdout
    assert read_info(tmp_path / "ckpt").dtype == "bfloat16"
    quiet = cli("to_hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == f"wrote {tmp_path / 'hf'} in " + quiet.stdout.split(" in ")[-1].strip()
    assert "%" not in quiet.stdout + quiet.stderr

    bad = shutil.copytree(sources["tied_f32"], tmp_path / "bad")
    _llava(bad)
    fail = cli("from_hf", "--hf_dir", str(bad), "--out", str(tmp_path / "ckpt2"))
    assert fail.returncode == 1
    assert "Traceback" not in fail.stderr
    lines = fail.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model_type='llava'" in lines[0], fail.stderr
    assert not (tmp_path / "ckpt2").exists()

    for command, flags in {
        "from_hf": ["--hf_dir", "--out", "--dtype", "--scan_layers", "--no-scan_layers", "--force", "--quiet"],
        "to_hf": ["--ckpt", "--out", "--max_shard_size", "--dtype", "--force", "--quiet"],
    }.items():
        text = cli(command, "--help").stdout
        assert all(flag in text for flag in flags), text
