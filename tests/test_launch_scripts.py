"""The launch scripts (launch/): each rendered with example values, and the command and environment every host
would run read back: the TPU pod's ssh to all workers (its dry run), the SLURM batch file run under a stand-in
``srun`` that records what it was given, the Kubernetes JobSet rendered as envsubst would and parsed; the
environment each starts its processes with makes ``mmret.launch`` initialise jax.distributed as intended."""

from __future__ import annotations

import json
import os
import re
import shlex
import string
import subprocess
from pathlib import Path

import pytest
import yaml

from mmret import launch

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
ARGS = "--config.data.root=gs://b/M-BEIR --config.optimizer.total_steps=10"


def _env(**values: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return {**keep, **values}


def test_tpu_pod_ssh_runs_the_same_install_and_entry_point_on_every_worker():
    values = dict(
        TPU_NAME="v5p-run", ZONE="us-east5-a", PROJECT="proj", WORKDIR="gs://b/runs/s3", ARGS=ARGS, REF="abc123"
    )
    r = subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh")], env=_env(**values, DRY_RUN="1"), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5p-run"]
    assert {"--zone=us-east5-a", "--project=proj", "--worker=all"} <= set(argv)
    remote = next(a for a in argv if a.startswith("--command=")).split("=", 1)[1]
    steps = [s.strip() for s in remote.split("&&")]
    assert "git fetch -q origin abc123" in steps and "git checkout -q FETCH_HEAD" in steps
    assert ".venv/bin/pip install -q -e '.[tpu]'" in steps
    entry = steps[-1].split(" 2>&1 | tee ")[0]
    assert shlex.split(entry) == [
        ".venv/bin/python",
        "-m",
        "mmret.launch",
        "--config=umarvel.py",
        "--workdir=gs://b/runs/s3",
        *ARGS.split(),
    ]
    missing = subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh")],
        env=_env(ZONE="z", PROJECT="p", WORKDIR="w"),
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "set TPU_NAME" in missing.stderr


def _sbatch_options(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), flags=re.M))


def test_slurm_batch_file_starts_one_process_per_gpu_through_srun(tmp_path):
    options = _sbatch_options(LAUNCH / "slurm_gpu.sbatch")
    assert options["ntasks-per-node"] == options["gpus-per-node"] and options["gpus-per-task"] == "1"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.json"
    (bin_dir / "srun").write_text(  # records its arguments, working directory and environment
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        "ran = {'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)}\n"
        f"json.dump(ran, open({str(record)!r}, 'w'))\n"
    )
    (bin_dir / "srun").chmod(0o755)
    env = _env(
        WORKDIR="/shared/runs/s3",
        CONFIG="umarvel.py:mbeir_demo",
        ARGS=ARGS,
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="16",
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    r = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ran = json.loads(record.read_text())
    assert ran["argv"] == [
        "--kill-on-bad-exit=1",
        f"{REPO}/.venv/bin/python",
        "-m",
        "mmret.launch",
        "--config=umarvel.py:mbeir_demo",
        "--workdir=/shared/runs/s3",
        *ARGS.split(),
    ]
    assert ran["cwd"] == str(REPO) and ran["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".95"
    missing = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch")], env=_env(), capture_output=True, text=True)
    assert missing.returncode != 0 and "set WORKDIR" in missing.stderr


def test_slurm_task_environment_makes_the_entry_point_initialise_jax_distributed(monkeypatch):
    """What srun gives each of 16 tasks: several hosts, and no process count or id of mmret's own (JAX's SLURM
    detection reads SLURM_NTASKS / SLURM_PROCID itself)."""
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert launch.multihost() and launch.distributed_options() == {}
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not launch.multihost()


def _render_jobset(**values: str) -> dict:
    text = string.Template((LAUNCH / "k8s_jobset.yaml").read_text()).substitute(values)  # envsubst's ${VAR}
    return yaml.safe_load(text)


def test_k8s_jobset_renders_indexed_pods_that_find_their_coordinator(monkeypatch):
    values = dict(
        NAME="mmret-s3",
        IMAGE="ghcr.io/x/mmret:1",
        NUM_HOSTS="4",
        GPUS_PER_HOST="8",
        CONFIG="umarvel.py",
        WORKDIR="gs://b/runs/s3",
        ARGS=ARGS,
    )
    doc = _render_jobset(**values)
    assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "mmret-s3"
    job = doc["spec"]["replicatedJobs"][0]
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 4 and spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == ["bash", "-c"]
    assert shlex.split(container["args"][0]) == [
        "python",
        "-m",
        "mmret.launch",
        "--config=umarvel.py",
        "--workdir=gs://b/runs/s3",
        *ARGS.split(),
    ]
    env = {e["name"]: e for e in container["env"]}
    # pod 0 of the replicated job "workers", through the JobSet's headless service (named after the JobSet)
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == f"mmret-s3-{job['name']}-0-0.mmret-s3:1234"
    assert env["JAX_NUM_PROCESSES"]["value"] == "4"
    index = env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    # the environment pod 2 gets: mmret.launch initialises jax.distributed with its count and id
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", env["JAX_COORDINATOR_ADDRESS"]["value"])
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert launch.multihost() and launch.distributed_options() == {"num_processes": 4, "process_id": 2}
    monkeypatch.setenv("JAX_PROCESS_ID", "two")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='two' is not an integer"):
        launch.distributed_options()
    with pytest.raises(KeyError, match="IMAGE"):
        _render_jobset(**{k: v for k, v in values.items() if k != "IMAGE"})


# --- the whole trainer across processes, started as the SLURM script starts them ------------------------------

STEPS = 4  # killed after its 2nd checkpoint, so the resume trains at least one step


def _params(state_dir: Path) -> dict:
    """A checkpoint's trainable parameters as host numpy arrays (flat path -> array)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(state_dir)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        params = ckptr.restore(state_dir, restore_args=args)["params"]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_the_trainer_across_two_slurm_tasks_is_killed_resumes_and_equals_one_process(tiny_mbeir, tmp_path):
    """The demo preset on 2 tasks of 2 CPU devices each (gloo), started by launch/slurm_gpu.sbatch through a
    stand-in srun (tests/_fake_srun.py: SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NODELIST as srun sets them):
    killed (SIGKILL to both) after its first checkpoints, started again the same way, it resumes and ends with the
    parameters and losses of ONE process of 4 devices given the same global batch (8 a host x 2 = 16)."""
    import signal
    import sys
    import time

    import numpy as np
    from helpers import load_tool, xla_flags

    from mmret.checkpoints import steps

    model = tmp_path / "model"
    assert load_tool("make_tiny_model").main(["--out", str(model)]) == 0
    common = [
        f"--config.model.hf_dir={model}",
        f"--config.data.root={tiny_mbeir}",
        "--config.eval.at_start=False",
        "--config.eval.at_end=False",
        f"--config.optimizer.total_steps={STEPS}",
        "--config.log_every=1",
        "--config.checkpoint.every=1",
        "--config.checkpoint.keep=10",
        # packed rows that divide over 2 devices a host and over 4 in one process (the demo's 12 / 10 are for 1)
        "--config.data.pipeline.query_packing.rows=(8,)",
        "--config.data.pipeline.candidate_packing.rows=(8,)",
    ]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").symlink_to(REPO / "tests" / "_fake_srun.py")
    two = tmp_path / "two"
    env = _env(
        WORKDIR=str(two),
        CONFIG="umarvel.py:mbeir_demo",
        ARGS=" ".join([*common, "--config.data.pipeline.batch_size=8", "--config.grad_cache_chunk=8"]),
        PYTHON=sys.executable,
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_ID=str(1000 + os.getpid() % 3000),  # the coordinator's port derives from it
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="localhost",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        XLA_FLAGS=xla_flags(2),
        JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    sbatch = ["bash", str(LAUNCH / "slurm_gpu.sbatch")]
    first = subprocess.Popen(sbatch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (two.exists() and steps(two) and steps(two)[-1] >= 2):
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # both tasks and the srun stand-in, mid-run
    first.wait()
    reached = steps(two)[-1]
    assert 2 <= reached < STEPS, f"killed at step {reached}: too late to test the resume"
    second = subprocess.run(sbatch, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from step {reached}" in second.stdout + second.stderr
    one = tmp_path / "one"
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmret.launch",
            "--config=umarvel.py:mbeir_demo",
            f"--workdir={one}",
            *common,
            "--config.data.pipeline.batch_size=16",
            "--config.grad_cache_chunk=16",
        ],
        env={**{k: v for k, v in env.items() if not k.startswith("SLURM_")}, "XLA_FLAGS": xla_flags(4)},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert steps(two)[-1] == steps(one)[-1] == STEPS
    ours, theirs = _losses(two), _losses(one)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(theirs)], rtol=1e-4)
    a, b = _params(two / "checkpoints" / str(STEPS) / "state"), _params(one / "checkpoints" / str(STEPS) / "state")
    assert a.keys() == b.keys() and len(a) > 10
    first_step = _params(one / "checkpoints" / "1" / "state")
    moved = max(np.abs(b[k] - first_step[k]).max() for k in list(b)[:5])
    assert moved > 1e-4  # the steps after the first changed the weights
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)
