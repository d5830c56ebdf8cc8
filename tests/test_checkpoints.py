"""mmret.checkpoints: a run checkpoint written before the redesign (by commit db0d018's trainer, whose data
item came from a hand-written orbax handler) still resumes, bitwise on the path the old code took.

tests/data/run_db0d018/ holds step 4 of a run of the tiny Qwen2-VL (random weights from seed 0, an mmret
checkpoint) with LoRA rank 2 and dropout 0.05 on the tiny synthetic corpus (seed 0), 2 CPU devices; made with
the config below by ``python -m mmret.train.trainer`` at db0d018, with total_steps 4 of a 6-step schedule.
``expected_step_6.json`` is what the same code logged and saved at step 6 when run uninterrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import pytest

from mmret import checkpoints

REPO = Path(__file__).resolve().parents[1]
OLD_RUN = REPO / "tests" / "data" / "run_db0d018"


def old_config(base: Path) -> dict:
    return {
        "model": {"checkpoint": str(base / "tiny"), "scan_layers": True},
        "freeze": [r"language_model\.embed_tokens\..*"],
        "lora": {"rank": 2, "dropout": 0.05},
        "data": {
            "root": str(base / "mbeir"),
            "processor": {"max_pixels": 16 * 28 * 28},
            "pipeline": {
                "batch_size": 4,
                "max_query_length": 128,
                "max_candidate_length": 128,
                "max_query_patches": 256,
                "max_candidate_patches": 256,
            },
        },
        "optimizer": {"learning_rate": 1e-3, "total_steps": 6, "warmup_steps": 2},
        "total_steps": 6,
        "mesh": {"data": 2},
        "log_every": 1,
        "checkpoint": {"every": 2, "keep": 3},
    }


SAVE_TINY = """
import json, sys
from pathlib import Path
from mmret.convert.checkpoint import save_model
from mmret.models import from_preset, preset_config
from mmret.models.qwen2_vl.processor_files import write_processor_files
base = Path(sys.argv[1])
write_processor_files(base / "hf_files")
(base / "hf_files" / "config.json").write_text(json.dumps(preset_config("tiny")))
save_model(base / "tiny", from_preset("tiny", seed=0), hf_files_from=base / "hf_files")
"""


def test_a_checkpoint_from_before_the_redesign_resumes_where_it_stopped(tmp_path):
    from mmret.data.synthetic import write_synthetic_mbeir

    # In subprocesses on 2 devices, as the stored run was made (with XLA's default options; the suite's
    # optimisation level moves the last bits, which the comparison below allows).
    env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(2), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", SAVE_TINY, str(tmp_path)], env=env, cwd=REPO, check=True, timeout=300)
    write_synthetic_mbeir(tmp_path / "mbeir", scale="tiny", seed=0)
    workdir = tmp_path / "run"
    shutil.copytree(OLD_RUN / "checkpoints", workdir / "checkpoints")
    assert checkpoints.steps(workdir) == [4]
    (tmp_path / "cfg.json").write_text(json.dumps(old_config(tmp_path)))
    r = helpers.run_trainer(tmp_path / "cfg.json", workdir, devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 4" in r.stdout
    expected = json.loads((OLD_RUN / "expected_step_6.json").read_text())
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["final_step"] == 6
    # Bitwise on the machine that stored the run; another CPU (its vector width) rounds XLA's sums differently
    # (seen: loss 1.7478256 stored on the earlier box, 1.7478251 on an AVX-512 EPYC), so within 1e-5: a wrong
    # restore (optimiser state, data position, frozen weights) moves these by far more.
    assert summary["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert summary["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert checkpoints.steps(workdir) == [4, 6]
    params = _trainable(workdir / "checkpoints" / "6" / "state", env)
    assert params["count"] == expected["params"]
    assert params["sum_of_squares"] == pytest.approx(expected["params_sum_of_squares"], rel=1e-6)


def _trainable(state_dir: Path, env: dict) -> dict:
    """Count and float64 sum of squares of a checkpoint's trainable parameters (read on 2 devices, as saved)."""
    code = f"""
import json, jax, numpy as np, orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
mesh = Mesh(np.array(jax.devices()), ("d",))
meta = ocp.PyTreeCheckpointer().metadata({str(state_dir)!r})
tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=NamedSharding(mesh, PartitionSpec())), tree)
params = jax.tree.leaves(ocp.PyTreeCheckpointer().restore({str(state_dir)!r}, restore_args=args)["params"])
print(json.dumps({{"count": sum(int(np.asarray(x).size) for x in params),
                  "sum_of_squares": float(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in params))}}))
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_resolve_step_names_what_exists(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(OLD_RUN / "checkpoints", workdir / "checkpoints")
    assert checkpoints.resolve_step(workdir, None) == 4 and checkpoints.resolve_step(workdir, 0) == 0
    try:
        checkpoints.resolve_step(workdir, 5)
    except FileNotFoundError as e:
        assert "have: [4]" in str(e)
    else:
        raise AssertionError("step 5 does not exist")
    assert checkpoints.steps(tmp_path / "nothing") == []
