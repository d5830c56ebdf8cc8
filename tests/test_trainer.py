"""The trainer: preemption (SIGTERM saves and exits 0; SIGKILL loses nothing), resume bitwise equal to
an uninterrupted run, fallback from an unreadable checkpoint, the non-finite guard, metric files.

Every run is a subprocess (``python -m mmret.train.trainer``) on 2 simulated CPU devices, training the
tiny Qwen2-VL (random weights, loaded from an mmret checkpoint) on the tiny synthetic M-BEIR corpus; the
session's persistent compilation cache (tests/conftest.py, inherited through the environment) keeps the
later runs from compiling the step again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
from helpers import read_scalars

from mmret.recipe import TrainerConfig, as_trainer_config, step_pipeline
from mmret.tasks.bi_encoder.task import BiEncoder, global_positive_mask

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
METRIC_KEYS = {"loss", "accuracy", "temperature", "grad_norm", "learning_rate", "examples_per_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, processor_dir, tiny_mbeir) -> dict:
    base = tmp_path_factory.mktemp("trainer")
    from mmret.convert.checkpoint import save_model
    from mmret.models import qwen2_vl
    from mmret.models.qwen2_vl.presets import hf_config

    hf_files = base / "hf_files"  # config + tokenizer / processor files; the weights go to an mmret checkpoint
    shutil.copytree(processor_dir, hf_files)
    (hf_files / "config.json").write_text(json.dumps(hf_config("tiny")))
    model = qwen2_vl.create(qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_config("tiny")), seed=0)
    save_model(base / "tiny", model, hf_files_from=hf_files)
    proc_env = dict(os.environ)
    proc_env.update(
        XLA_FLAGS=helpers.xla_flags(2),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO) + os.pathsep + proc_env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    return {"base": base, "mbeir": tiny_mbeir, "env": proc_env}  # the session's corpus (tests/conftest.py)


def config(env: dict, **overrides) -> dict:
    cfg = {
        "model": {"checkpoint": str(env["base"] / "tiny"), "scan_layers": True},
        "freeze": [r"language_model\.embed_tokens\..*"],  # keeps checkpoints small
        "data": {
            "root": str(env["mbeir"]),
            "processor": {"max_pixels": 16 * 28 * 28},
            "pipeline": {
                "batch_size": 4,
                "max_query_length": 128,
                "max_candidate_length": 128,
                "max_query_patches": 4 * 64,
                "max_candidate_patches": 4 * 64,
            },
        },
        "optimizer": {"learning_rate": 1e-3, "total_steps": STEPS, "warmup_steps": 2},
        "mesh": {"data": 2},
        "log_every": 1,
        "checkpoint": {"every": 2, "keep": 3},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def start(env: dict, cfg: dict, workdir: Path) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir.parent / f"{workdir.name}.json"
    path.write_text(json.dumps(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "mmret.train.trainer", "--config", str(path), "--workdir", str(workdir)],
        env=env["env"],
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(env: dict, cfg: dict, workdir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    p = start(env, cfg, workdir)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_until(env: dict, cfg: dict, workdir: Path, step: int, sig: int, timeout: float = 300) -> tuple[int, str, str]:
    """Start a run, send ``sig`` once the progress line of ``step`` (or a later one) is printed."""
    p = start(env, cfg, workdir)
    lines = []
    deadline = time.monotonic() + timeout
    assert p.stdout is not None
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step ") and "/" in line and int(line.split()[1].split("/")[0]) >= step:
            p.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(lines)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, "".join(lines) + out, err


def stored_state(workdir: Path, step: int) -> dict:
    """A checkpoint's training state: {"step", "params" (trainable), "opt_state"} as stored."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bitwise_equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


def steps_saved(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def nonfinite_config(env: dict) -> dict:
    """Steps 2, 4 and 5 poisoned, at most 2 in a row allowed: the run stops at step 5."""
    return config(
        env,
        inject_nonfinite_steps=[2, 4, 5],
        max_nonfinite_steps=2,
        **{"checkpoint.every": 1, "checkpoint.keep": 10, "optimizer.total_steps": 6},
    )


@pytest.fixture(scope="module")
def first_runs(env) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The two runs that need no other: the reference and the non-finite one, at the same time (each
    process mostly imports and compiles, one core each; their steps differ, so neither waits on the
    other's cache entries)."""
    runs = {"reference": config(env), "nonfinite": nonfinite_config(env)}
    started = {name: start(env, cfg, env["base"] / name) for name, cfg in runs.items()}
    done = {}
    for name, p in started.items():
        out, err = p.communicate(timeout=300)
        done[name] = (env["base"] / name, subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def reference(first_runs) -> Path:
    """An uninterrupted run of STEPS steps."""
    wd, result = first_runs["reference"]
    assert result.returncode == 0, result.stderr[-3000:]
    return wd


def test_metrics_files(reference):
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records[1:]:
        assert METRIC_KEYS <= set(r), r
        assert r["examples_per_s"] > 0 and r["tokens_per_s"] > r["examples_per_s"]
    assert records[0]["learning_rate"] == 0.0 and records[1]["learning_rate"] == pytest.approx(5e-4)
    assert all(np.isfinite(r["loss"]) for r in records)
    scalars = read_scalars(reference / "tb")
    assert METRIC_KEYS <= set(scalars)
    assert [s for s, _ in scalars["loss"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [r["loss"] for r in records], rtol=1e-6)
    assert json.loads((reference / "config.json").read_text())["optimizer"]["total_steps"] == STEPS
    assert steps_saved(reference) == [4, 6, 8]  # every 2 steps, keep 3
    data = json.loads((reference / "checkpoints" / "8" / "data" / "process_0-of-1.json").read_text())
    assert set(data) == {"iterator", "bad_records"}


def test_preempted_then_killed_run_resumes_bitwise(env, reference):
    """SIGTERM -> save at the next step boundary, exit 0; resume; SIGKILL mid-way; resume: the end
    equals the uninterrupted run, bit for bit."""
    wd = env["base"] / "preempted"
    cfg = config(env)

    rc, out, err = run_until(env, cfg, wd, step=3, sig=signal.SIGTERM)
    assert rc == 0, err[-3000:]
    saved = int(out.split("preempted: saved step ")[1].split(";")[0])
    assert 3 <= saved <= STEPS - 2 and saved in steps_saved(wd)

    rc, out, err = run_until(env, cfg, wd, step=min(saved + 2, STEPS - 1), sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL, err[-3000:]
    assert f"resuming from step {saved}" in out

    result = run(env, cfg, wd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step " in result.stdout and "unreadable" not in result.stderr
    assert_bitwise_equal(leaves(stored_state(wd, STEPS)), leaves(stored_state(reference, STEPS)))


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(env, reference):
    wd = env["base"] / "corrupt"
    shutil.copytree(reference, wd)
    for f in (wd / "checkpoints" / str(STEPS) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    result = run(env, config(env), wd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unreadable" in result.stderr and f"checkpoints/{STEPS}" in result.stderr
    assert [p.name.split(".")[0] for p in (wd / "checkpoints_unreadable").iterdir()] == [str(STEPS)]
    assert f"resuming from step {STEPS - 2}" in result.stdout
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # 7 and 8 rewritten, not repeated
    assert_bitwise_equal(leaves(stored_state(wd, STEPS)), leaves(stored_state(reference, STEPS)))


def test_nonfinite_steps_are_skipped_then_stop_the_run(first_runs):
    wd, result = first_runs["nonfinite"]
    assert result.returncode != 0
    assert "NonFiniteError" in result.stderr and "2 steps in a row" in result.stderr
    assert "step 2: non-finite loss or gradient, step skipped" in result.stdout
    assert steps_saved(wd) == [1, 2, 3, 4]  # step 5 stopped the run before its checkpoint
    s1, s2, s3, s4 = (stored_state(wd, i) for i in (1, 2, 3, 4))
    for key in ("params", "opt_state"):  # a skipped step changes neither
        assert_bitwise_equal(leaves(s2[key]), leaves(s1[key]))
        assert_bitwise_equal(leaves(s4[key]), leaves(s3[key]))
    assert int(s2["step"]) == 2  # the step counter counts batches
    assert any((a != b).any() for a, b in zip(leaves(s3["params"]), leaves(s2["params"]), strict=True))
    records = {r["step"]: r for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())}
    assert records[2]["skipped_steps"] == 1 and "loss" not in records[2]
    assert records[3]["skipped_steps"] == 1 and np.isfinite(records[3]["loss"])
    assert records[3]["learning_rate"] == pytest.approx(5e-4)  # the schedule's step counts applied updates


# --------------------------------------------------------------------------------- fast unit checks


def test_config_from_nested_dict_rejects_unknown_keys(tmp_path):
    cfg = as_trainer_config({"model": {"preset": "tiny"}, "freeze": ["visual\\..*"], "optimizer": {"total_steps": 5}})
    assert isinstance(cfg, TrainerConfig) and cfg.freeze == ("visual\\..*",) and cfg.steps == 5
    with pytest.raises(ValueError, match=r"unknown key optimizer\.lr"):
        as_trainer_config({"model": {"preset": "tiny"}, "optimizer": {"lr": 1.0}})
    with pytest.raises(ValueError, match="exactly one of"):  # the bi-encoder task checks the model source
        BiEncoder().check(as_trainer_config({"model": {"preset": "tiny", "hf_dir": str(tmp_path)}}))


def test_grad_cache_chunk_of_the_whole_batch_runs_the_plain_step():
    """A chunk as large as the per-host batch leaves nothing to cache: unchunked batches, plain step."""

    def cfg(**kw):
        base = {"model": {"preset": "tiny"}, "data": {"pipeline": {"batch_size": 8}}}
        return as_trainer_config({**base, **kw})

    assert step_pipeline(cfg(grad_cache_chunk=8)).grad_cache_chunk is None
    assert step_pipeline(cfg(data={"pipeline": {"batch_size": 8, "grad_cache_chunk": 8}})).grad_cache_chunk is None
    assert step_pipeline(cfg(grad_cache_chunk=4)).grad_cache_chunk == 4
    assert step_pipeline(cfg()).grad_cache_chunk is None


def test_global_positive_mask_follows_the_global_embedding_order():
    """Two hosts, 2 GradCache chunks of 2 queries with 2 candidates each: the hosts' blocks,
    concatenated as put_batch does and flattened, index queries and candidates chunk-major, then host."""
    n, qc, k, hosts = 2, 2, 2, 2
    rng = np.random.default_rng(0)
    local = [rng.random((n * qc, n * qc * k)) < 0.3 for _ in range(hosts)]
    blocks = [global_positive_mask(m, n, h, hosts) for h, m in enumerate(local)]
    mask = np.concatenate(blocks, axis=1).reshape(n * qc * hosts, -1)

    def query(i: int, h: int, j: int) -> int:  # chunk i, host h, row j in the global order
        return (i * hosts + h) * qc + j

    def cand(i: int, h: int, j: int) -> int:
        return (i * hosts + h) * qc * k + j

    want = np.zeros_like(mask)
    for h in range(hosts):
        for a in range(n * qc):
            for b in range(n * qc * k):
                want[query(a // qc, h, a % qc), cand(b // (qc * k), h, b % (qc * k))] = local[h][a, b]
    np.testing.assert_array_equal(mask, want)
    one = rng.random((4, 8)) < 0.5  # one process, no chunks: unchanged
    np.testing.assert_array_equal(global_positive_mask(one, 1, 0, 1).reshape(4, 8), one)
