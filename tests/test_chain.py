"""Chained stages (mmret.chain): the merged stage configs, a stage starting from an earlier one's weights
(LoRA merged, temperature carried), and a chain killed in the middle of a stage that, restarted, skips the
finished stage, resumes the interrupted one and ends with the parameters of an uninterrupted chain.

The chains run through the entry point (``python -m mmret.launch``) in subprocesses on 2 simulated CPU
devices, the tiny random model (preset) on the session's tiny synthetic corpus.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import jax
import numpy as np
import pytest
from flax import nnx

from mmret import chain
from mmret.checkpoints import initial_model, load_trained, run_config, steps
from mmret.lora import merge_lora
from mmret.recipe import as_trainer_config

REPO = Path(__file__).resolve().parents[1]

CONFIG_PY = """import json
import ml_collections


def get_config(arg=None):
    return ml_collections.ConfigDict(json.loads({text!r}))
"""


def chain_config(mbeir: Path, proc: Path) -> dict:
    return {
        "model": {"preset": "tiny", "seed": 0},
        "lora": {"rank": 2, "alpha": 4.0},
        "freeze": [r"language_model\.embed_tokens\..*"],
        "data": {
            "root": str(mbeir),
            "processor_dir": str(proc),
            "processor": {"max_pixels": 16 * 28 * 28},
            "pipeline": {
                "batch_size": 4,
                "max_query_length": 128,
                "max_candidate_length": 128,
                "max_query_patches": 4 * 64,
                "max_candidate_patches": 4 * 64,
            },
        },
        "optimizer": {"learning_rate": 1e-3, "total_steps": 2, "warmup_steps": 1},
        "mesh": {"data": 2},
        "log_every": 1,
        "checkpoint": {"every": 2, "keep": 5, "async_save": False},
        "stages": [
            {"name": "first", "overrides": {"temperature": {"learnable": True}}},
            {
                "name": "second",
                "init_from": "first",
                "overrides": {"optimizer": {"learning_rate": 5e-4, "total_steps": 6}, "lora": {"rank": 4}},
            },
        ],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory, processor_dir, tiny_mbeir) -> dict:
    base = tmp_path_factory.mktemp("chain")
    cfg = chain_config(tiny_mbeir, processor_dir)
    config_file = base / "chain_config.py"
    config_file.write_text(CONFIG_PY.format(text=json.dumps(cfg)))
    proc_env = dict(os.environ)
    proc_env.update(
        XLA_FLAGS=helpers.xla_flags(2),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO) + os.pathsep + proc_env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    return {"base": base, "cfg": cfg, "config_file": config_file, "env": proc_env}


def start(env: dict, workdir: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "mmret.launch", f"--config={env['config_file']}", f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        args, env=env["env"], cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(p: subprocess.Popen, before: str = "", timeout: float = 400) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, before + out, err


@pytest.fixture(scope="module")
def runs(env) -> dict:
    """An uninterrupted chain, and at the same time one killed (SIGKILL) at step 3 of its second stage;
    then the killed one restarted."""
    whole, killed = env["base"] / "whole", env["base"] / "killed"
    p_whole, p_killed = start(env, whole), start(env, killed)
    lines, in_second, deadline = [], False, time.monotonic() + 400
    assert p_killed.stdout is not None
    for line in p_killed.stdout:
        lines.append(line)
        in_second = in_second or line.startswith("=== stage second")
        if in_second and line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 3:
            p_killed.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "".join(lines)
    rc_killed, out_killed, _ = finish(p_killed, "".join(lines))
    rc_whole, out_whole, err_whole = finish(p_whole)
    assert rc_whole == 0, err_whole[-3000:]
    rc_restart, out_restart, err_restart = finish(start(env, killed))
    assert rc_restart == 0, err_restart[-3000:]
    return {
        "whole": (whole, out_whole),
        "killed": (killed, rc_killed, out_killed),
        "restart": (killed, out_restart),
    }


def all_leaves(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_merge_and_stage_configs(tmp_path, processor_dir, tiny_mbeir):
    assert chain.merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": [2, 3]}) == {
        "a": {"b": 1, "c": 3},
        "d": [2, 3],
    }
    cfg = as_trainer_config(chain_config(tiny_mbeir, processor_dir))
    first = chain.stage_config(cfg, "first", tmp_path)
    second = chain.stage_config(cfg, "second", tmp_path)
    assert first.model.init_from is None and first.stages == () and first.lora.rank == 2
    assert second.model.init_from == str(tmp_path / "first") and second.lora.rank == 4
    assert second.optimizer.learning_rate == 5e-4 and second.optimizer.warmup_steps == 1  # merged, not replaced
    assert second.data.root == str(tiny_mbeir)


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"name": "a"}, {"name": "a"}], "appears twice"),
        ([{"name": "a", "init_from": "b"}, {"name": "b"}], "not an earlier stage"),
        ([{"name": "a"}, {"name": "b", "mine_from": "b"}], "not an earlier stage"),
        ([{"name": "../up"}], "not a directory name"),
        ([{"name": "a", "overrides": {"lora": {"rnak": 2}}}], r"stages\[0\] \(a\)\.lora\.rnak"),
    ],
)
def test_bad_stages_are_rejected_naming_the_stage(stages, message, tmp_path):
    cfg = as_trainer_config({"model": {"preset": "tiny"}, "stages": stages})
    with pytest.raises(ValueError, match=message):
        chain.check_stages(cfg)


def test_a_stage_starts_from_the_merged_weights_and_temperature_of_the_one_before(runs, env):
    whole, _ = runs["whole"]
    first_dir, second_dir = whole / "first", whole / "second"
    first = load_trained(run_config(first_dir), first_dir, 2)
    second_cfg = run_config(second_dir)
    assert second_cfg.model.init_from == str(first_dir)
    start_model = initial_model(second_cfg)
    # the second stage's own adapters start at zero (lora_b), so merging them changes nothing
    assert len(jax.tree.leaves(nnx.state(start_model, nnx.Param))) > len(all_leaves(first))
    for a, b in zip(all_leaves(merge_lora(start_model)), all_leaves(first), strict=True):
        np.testing.assert_array_equal(a, b)
    base = load_trained(run_config(first_dir), first_dir, 0)  # the model source: stage one did move it
    assert any(not np.array_equal(a, b) for a, b in zip(all_leaves(first), all_leaves(base), strict=True))
    assert float(first.temperature()) != pytest.approx(0.05, abs=1e-6)  # learnt in stage one, then carried
    assert float(start_model.temperature()) == float(first.temperature())


def test_killed_chain_resumes_to_the_uninterrupted_parameters(runs):
    whole, out_whole = runs["whole"]
    killed, rc_killed, out_killed = runs["killed"]
    _, out_restart = runs["restart"]
    assert rc_killed == -signal.SIGKILL
    assert chain.done(killed, "first") is not None and "=== stage second" in out_killed
    assert "stage first: finished at step 2, skipped" in out_restart
    assert "resuming from step 2" in out_restart  # the second stage's last checkpoint before the kill
    assert steps(whole / "second") == steps(killed / "second") == [2, 4, 6]
    for wd in (whole, killed):  # the closing table lists both stages
        text = out_whole if wd == whole else out_restart
        assert "| first | 2 |" in text and "| second | 6 |" in text
    a = load_trained(run_config(whole / "second"), whole / "second", 6)
    b = load_trained(run_config(killed / "second"), killed / "second", 6)
    for x, y in zip(all_leaves(a), all_leaves(b), strict=True):
        np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


def test_a_process_restores_each_stage_once_and_hands_out_copies(runs, monkeypatch):
    """load_trained keeps the last retriever it restored: loading the second stage after the first restores only
    the second's checkpoint (not the first's again under it); the result equals a load from nothing, bitwise; a
    change to a handed-out model does not reach the next; a checkpoint rewritten in place is read again."""
    from mmret import checkpoints

    whole, _ = runs["whole"]
    first_dir, second_dir = whole / "first", whole / "second"
    read: list[str] = []
    original = checkpoints.restore_params
    monkeypatch.setattr(checkpoints, "restore_params", lambda m, wrt, d: read.append(str(d)) or original(m, wrt, d))
    checkpoints.forget_trained()
    load_trained(run_config(first_dir), first_dir, 2)
    assert read and all(str(first_dir) in d for d in read)
    read.clear()
    second = load_trained(run_config(second_dir), second_dir, 6)
    assert read and all(str(second_dir) in d for d in read)  # the first stage's model came from the kept one
    read.clear()
    again = load_trained(run_config(second_dir), second_dir, 6)
    assert read == []
    checkpoints.forget_trained()
    fresh = load_trained(run_config(second_dir), second_dir, 6)
    assert any(str(first_dir) in d for d in read)  # from nothing: the first stage restored under the second
    for x, y, z in zip(all_leaves(second), all_leaves(again), all_leaves(fresh), strict=True):
        np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(z).view(np.uint8))
        np.testing.assert_array_equal(np.atleast_1d(y).view(np.uint8), np.atleast_1d(z).view(np.uint8))
    read.clear()
    for handed_out in (fresh, load_trained(run_config(second_dir), second_dir, 6)):  # restored, then kept
        log_tau = handed_out.temperature.log_tau
        log_tau.set_value(log_tau[...] + 1.0)  # a change to a handed-out copy
        next_one = load_trained(run_config(second_dir), second_dir, 6)
        assert float(next_one.temperature.log_tau[...]) == float(second.temperature.log_tau[...])
    assert read == []
    ckpt = second_dir / "checkpoints" / "6"
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 1000))
    load_trained(run_config(second_dir), second_dir, 6)
    assert any(str(second_dir) in d for d in read)
