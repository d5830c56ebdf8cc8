"""The entry point: config files and presets, overrides, clear errors, and a short demo run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest

from mmret import tasks
from mmret.data.mbeir import read_queries
from mmret.launch import CONFIGS, resolve_config_arg
from mmret.recipe import as_trainer_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs.umarvel import get_config  # noqa: E402


def launch(*args: str, timeout: int = 600, devices: int | None = None) -> subprocess.CompletedProcess:
    """``python -m mmret.launch ARGS``; on ``devices`` simulated CPU devices if given (else the suite's 8)."""
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = helpers.xla_flags(devices)
    return subprocess.run(
        [sys.executable, "-m", "mmret.launch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def test_bare_config_name_resolves_to_configs_dir():
    assert resolve_config_arg(["x", "--config=umarvel.py:demo"]) == ["x", f"--config={CONFIGS / 'umarvel.py'}:demo"]
    assert resolve_config_arg(["--config=configs/umarvel.py"]) == ["--config=configs/umarvel.py"]


def test_default_config_is_the_papers_stage_3_recipe():
    c = get_config()
    assert (c.lora.rank, c.lora.alpha) == (128, 256.0)
    assert c.optimizer.learning_rate == 4e-4 and c.optimizer.warmup_ratio == 0.03 and c.optimizer.weight_decay == 0
    assert c.temperature.init == 0.05 and c.temperature.learnable
    assert c.data.processor.max_pixels == 300 * 28 * 28 and c.data.processor.max_text_tokens == 480
    assert c.encoder.attention == "bidirectional" and c.encoder.pooling == "mean"
    assert c.model.dtype == "bfloat16" and c.model.param_dtype == "float32"
    assert any("visual" in f for f in c.freeze)
    # It needs a model and an M-BEIR root; given them, it is a valid trainer config.
    with pytest.raises(ValueError, match="hf_dir"):  # checked by the task the config names
        tasks.get(as_trainer_config(c).task).check(as_trainer_config(c))
    c.unlock()
    c.model.hf_dir, c.data.root = "/models/Qwen2-VL-7B-Instruct", "/data/M-BEIR"
    cfg = as_trainer_config(c)
    assert cfg.data.pipeline.batch_size * 8 == 3840 and cfg.lora.rank == 128
    # Every search setting is a config key (overridable as --config.eval.search.NAME).
    c.eval.search.method, c.eval.search.num_leaves = "scann", 500
    search = as_trainer_config(c).eval.search
    assert (search.method, search.num_leaves, search.reorder) == ("scann", 500, None)
    c.eval.search.method = "fast"
    with pytest.raises(ValueError, match="eval.search.method"):
        as_trainer_config(c)


def test_unknown_key_and_bad_value_are_rejected_before_anything_runs(tmp_path):
    entry = [sys.executable, "-m", "mmret.launch", f"--workdir={tmp_path}"]
    key, value, missing, preset = helpers.run_at_once(  # four independent launches
        [*entry, "--config=umarvel.py:demo", "--config.optimizer.total_stepz=3"],
        [*entry, "--config=umarvel.py:demo", "--config.optimizer.total_steps=abc"],
        [*entry, "--config=umarvel.py"],
        [*entry, "--config=umarvel.py:nope"],
        cwd=ROOT,
    )
    assert key.returncode != 0 and "unknown config key: total_stepz" in key.stderr
    assert value.returncode != 0 and "total_steps=abc" in value.stderr
    assert missing.returncode != 0 and "bad config" in missing.stderr and "hf_dir" in missing.stderr
    assert preset.returncode != 0 and "unknown preset 'nope'" in preset.stderr
    assert not (tmp_path / "checkpoints").exists()


EVAL_TASKS = ("mscoco_task0", "webqa_task1", "cirr_task7")
MINED = ("webqa_task1",)  # --mode=mine: text queries, a text pool
STEPS = 4  # enough for the loss to fall and the weights to move; every step costs a batch of 64


def test_demo_preset_trains_through_the_entry_point(tiny_mbeir, tmp_path):
    """The single-stage demo preset (U-MARVEL's M-BEIR stage on the tiny model from tools/make_tiny_model.py,
    the tiny corpus) trained for STEPS steps: the start and end evaluations, the checkpoint, the closing
    tables, --mode=eval, --mode=mine."""
    assert helpers.load_tool("make_tiny_model").main(["--out", str(tmp_path / "model")]) == 0
    data = (
        f"--config.model.hf_dir={tmp_path / 'model'}",
        f"--config.data.root={tiny_mbeir}",
        f"--config.eval.tasks={EVAL_TASKS!r}",  # three of the 16, to keep the suite short
        "--config.eval.pools=('local',)",  # the global pool (the whole union pool): tests/test_eval_embed.py
    )
    r = launch(
        "--config=umarvel.py:mbeir_demo",
        f"--workdir={tmp_path / 'run'}",
        *data,
        f"--config.optimizer.total_steps={STEPS}",
        "--config.log_every=1",
        devices=1,  # sharding has its own tests; 8 simulated devices on the suite's 2 cores double the time
    )
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(1, STEPS + 1))
    losses = [rec["loss"] for rec in records]
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses  # the demo trains: its loss falls
    assert (tmp_path / "run" / "checkpoints" / str(STEPS)).is_dir()
    assert "| step | loss |" in r.stdout  # the closing result table
    # Evaluated before and after training on the local pools; the before/after table closes the run.
    end = str(STEPS)
    reports = {
        (step, pool): json.loads((tmp_path / "run" / "eval" / step / pool / "report.json").read_text())
        for step in ("0", end)
        for pool in ("local",)
    }
    assert all(rep["pool"] == pool and not rep["skipped"] for (_, pool), rep in reports.items())
    # --config.eval.tasks: those tasks, and the reports say that they are not the whole benchmark
    assert all(set(rep["tasks"]) == set(EVAL_TASKS) and not rep["complete"] for rep in reports.values())
    assert reports[(end, "local")]["checkpoint"].endswith(f"checkpoints/{end}")
    assert f"local pool, step 0 -> step {end}:" in r.stdout and "global pool" not in r.stdout
    # The two steps' embeddings differ (the trained checkpoint was loaded, not the start model).
    shard = Path("embeddings/queries/cirr_task7/shard-00000.npz")
    before, after = (np.load(tmp_path / "run" / "eval" / step / shard)["embeddings"] for step in ("0", end))
    assert before.shape == after.shape == (24, 64) and np.abs(before - after).max() > 1e-2
    # --mode=eval of an evaluated step reuses its reports.
    r = launch(
        "--config=umarvel.py:mbeir_demo",
        f"--workdir={tmp_path / 'run'}",
        *data,
        "--mode=eval",
        f"--step={end}",
        devices=1,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"eval step {end}, local pool: average" in r.stdout and "embed " not in r.stdout
    # --mode=mine with the step's checkpoint: DIR/mined/<step>/, the settings from the command line.
    mining = (f"--config.mining.tasks={MINED!r}", "--config.mining.pool=local", "--config.mining.negatives=4")
    r = launch(
        "--config=umarvel.py:mbeir_demo", f"--workdir={tmp_path / 'run'}", *data, *mining, "--mode=mine", devices=1
    )
    assert r.returncode == 0, r.stderr[-3000:]
    mined = [
        json.loads(line) for line in (tmp_path / "run" / "mined" / end / "negatives.jsonl").read_text().splitlines()
    ]
    train = {q.qid for task in MINED for q in read_queries(tiny_mbeir, "train", task)}
    assert {m["qid"] for m in mined} == train and len(mined) == len(train)
    assert all(len(m["neg_cand_list"]) == 4 for m in mined)
    summary = json.loads((tmp_path / "run" / "mined" / end / "summary.json").read_text())
    assert summary["rule"] == "umarvel" and summary["checkpoint"].endswith(f"run step {end}")
    # --mode=export: a plain transformers directory that the encode API reads back to the run's embeddings.
    r = launch("--config=umarvel.py:mbeir_demo", f"--workdir={tmp_path / 'run'}", *data, "--mode=export", devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    export = tmp_path / "run" / "export" / end
    assert f"exported step {end}" in r.stdout and (export / "mmret_embedding.json").is_file()
    transformers = pytest.importorskip("transformers")
    _, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    import mmret
    from mmret.data.mbeir import read_local_pool

    dids, stored = (
        np.load(tmp_path / "run" / "eval" / end / "embeddings/pools/local/cirr_task7/shard-00000.npz")[k]
        for k in ("ids", "embeddings")
    )
    pool = read_local_pool(tiny_mbeir, "cirr_task7")
    items = [
        {"text": pool[d].text, "image": None if pool[d].image_path is None else tiny_mbeir / pool[d].image_path}
        for d in dids[:8]
    ]
    got = mmret.Retriever.from_pretrained(export).encode_candidates(items)
    assert np.abs(got - stored[:8].astype(np.float32)).max() < 2e-3
    # The evaluation's pages (one a task beside report.md) render in a real browser, every thumbnail loaded.
    for task in EVAL_TASKS:
        page = tmp_path / "run" / "eval" / end / "local" / f"{task}.html"
        loaded, total = helpers.thumbnails_loaded(page, tmp_path / "browser" / task)
        assert loaded == total == page.read_text().count("<img ") > 0
