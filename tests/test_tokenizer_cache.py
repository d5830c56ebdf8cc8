"""mmret.data.tokenizer_cache: a Processor's tokenizer read from the cache on disk equals what
``transformers.AutoTokenizer`` makes of the directory (compared with transformers itself), a process that
hits it imports neither transformers nor torch, a changed file is a new entry, and a broken or unwritable
cache is skipped. Also: metrics' event files are written without importing torch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_scalars

from mmret.data import processor as processor_module
from mmret.data.processor import Processor
from mmret.data.tokenizer_cache import ENV, cache_dir

REPO = Path(__file__).resolve().parents[1]
TEXT = "Find a photo of <|im_start|> a red circle.<|endoftext|>"


def autotokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache of this test's own, and no tokenizer kept in this process from before."""
    root = tmp_path / "cache"
    monkeypatch.setenv(ENV, str(root))
    monkeypatch.setattr(processor_module, "_TOKENIZERS", {})
    return root / "tokenizers"


def entries(root: Path) -> list[Path]:
    return sorted(root.glob("*.json")) if root.is_dir() else []


HIT = """
import json, sys
from pathlib import Path
from mmret.data.processor import Processor
from mmret.train.metrics import MetricWriters
p = Processor(sys.argv[1])
w = MetricWriters(sys.argv[2], total_steps=1, out=open("/dev/null", "w"))
w.write(1, {"loss": 0.5})
w.close()
print(json.dumps({"ids": p._encoder.encode(sys.argv[3]).ids, "pad": p.pad_token_id,
                  "imported": sorted(m for m in ("transformers", "torch") if m in sys.modules)}))
"""


def test_a_hit_equals_autotokenizer_and_imports_neither_transformers_nor_torch(processor_dir, cache, tmp_path):
    first = Processor(processor_dir)  # a miss: through AutoTokenizer, written
    [entry] = entries(cache)
    stored = json.loads(entry.read_text())
    tok = autotokenizer(processor_dir)
    assert stored["backend"] == tok.backend_tokenizer.to_str() and stored["pad_token_id"] == tok.pad_token_id
    env = {**os.environ, ENV: str(cache.parent), "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", HIT, str(processor_dir), str(tmp_path / "run"), TEXT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    hit = json.loads(r.stdout.strip().splitlines()[-1])
    assert hit["imported"] == []  # neither transformers nor torch in the process that read the cache
    # the same tokens as a processor given transformers' tokenizer object itself (no cache on that path)
    direct = Processor(processor_dir, tokenizer=tok)
    assert hit["ids"] == direct._encoder.encode(TEXT).ids == first._encoder.encode(TEXT).ids
    assert hit["pad"] == tok.pad_token_id == first.pad_token_id
    assert len(hit["ids"]) > 5
    assert read_scalars(tmp_path / "run" / "tb")["loss"] == [(1, 0.5)]  # the event file, written without torch
    assert entries(cache) == [entry]  # a hit writes nothing


def test_a_changed_file_is_a_new_entry(processor_dir, cache, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(processor_dir, model)
    before = Processor(model).pad_token_id
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|im_end|>"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    after = Processor(model).pad_token_id
    assert before == autotokenizer(processor_dir).pad_token_id
    assert after == autotokenizer(model).pad_token_id != before
    assert len(entries(cache)) == 2
    (model / "model.safetensors").write_bytes(b"weights do not change the tokenizer")
    processor_module._TOKENIZERS.clear()
    assert Processor(model).pad_token_id == after and len(entries(cache)) == 2


def test_a_broken_entry_is_loaded_again_and_an_unwritable_cache_is_skipped(
    processor_dir, cache, tmp_path, monkeypatch, caplog
):
    want = autotokenizer(processor_dir).pad_token_id
    Processor(processor_dir)
    [entry] = entries(cache)
    good = entry.read_text()
    entry.write_text(good[:100])  # cut short, as by a full disk
    processor_module._TOKENIZERS.clear()
    with caplog.at_level(logging.WARNING, logger="mmret.data.tokenizer_cache"):
        assert Processor(processor_dir).pad_token_id == want
    assert "unreadable tokenizer cache entry" in caplog.text and str(entry) in caplog.text
    assert entry.read_text() == good  # written again, whole
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(ENV, str(blocker))
    processor_module._TOKENIZERS.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmret.data.tokenizer_cache"):
        assert Processor(processor_dir).pad_token_id == want
    assert "cannot write the tokenizer cache" in caplog.text
    monkeypatch.setenv(ENV, "off")
    assert cache_dir() is None
    processor_module._TOKENIZERS.clear()
    assert Processor(processor_dir).pad_token_id == want


def test_the_default_place_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "mmret" / "tokenizers"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "mmret" / "tokenizers"
