"""Small helpers shared by several test files (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WORDS = "red blue green circle square star left right small large".split()


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` as a module (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def uniir_format_string(s: str | None) -> str:
    """UniIR's ``format_string`` (``src/data/preprocessing/utils.py``; U-MARVEL copies it), restated
    independently of mmret's: drop ``\\r``, strip, strip double quotes, capitalise, add "." unless ``.?!``."""
    s = (s or "").replace("\r", "").strip().strip('"')
    if s:
        s = s[0].upper() + s[1:]
        s = s + "." if s[-1] not in [".", "?", "!"] else s
    return s


def random_pairs(proc, n: int, seed: int = 0) -> tuple[list, list]:
    """``n`` processed queries and ``n`` candidates: 5 random words each, a random 56x56 image on
    every other one (queries at even indices, candidates at odd), from one seeded generator."""
    rng = np.random.default_rng(seed)

    def example(i: int):
        img = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) if i % 2 == 0 else None
        return proc(text=" ".join(rng.choice(WORDS, 5)), image=img)

    return [example(i) for i in range(n)], [example(i + 1) for i in range(n)]


def with_pools_of(src: Path, dst: Path, tasks: Sequence[str], split: str) -> Path:
    """A copy at ``dst`` of the M-BEIR root ``src`` (files copied: a symlink out of a root is refused) in which
    only ``tasks`` keep their ``split`` local pool files and the split's union pool holds only their candidates
    (in its own order): a global pool of a few hundred candidates instead of the whole union's thousands."""
    import json
    import shutil

    from mmret.data.mbeir import EVAL_TASKS, global_pool_path, local_pool_path, read_local_pool

    shutil.copytree(src, dst)
    kept = {did for task in tasks for did in read_local_pool(dst, task, split)}
    for task in EVAL_TASKS:
        if task.name not in tasks and local_pool_path(dst, task.name, split).exists():
            local_pool_path(dst, task.name, split).unlink()
    union = global_pool_path(dst, split)
    lines = [line for line in union.read_text().splitlines() if line.strip()]
    union.write_text("".join(line + "\n" for line in lines if json.loads(line)["did"] in kept))
    return dst


DEVICES_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | str, *, suite: bool = True) -> str:
    """The suite's ``XLA_FLAGS`` (tests/conftest.py) with ``devices`` simulated CPU devices instead of its 8:
    what a test's subprocess gets, so that every process of the session compiles with the same options.
    ``suite=False``: XLA's default options (a run compared bit for bit with one stored in tests/data)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICES_FLAG)] if suite else []
    return " ".join([f"{DEVICES_FLAG}={devices}", *kept])


def start_worker(pid: int, nproc: int, port: str, local_devices: str) -> None:
    """In a multi-host test worker, before jax is imported: ``local_devices`` CPU devices, gloo collectives,
    and with ``nproc > 1`` a jax.distributed job on localhost:``port`` in which this is process ``pid``."""
    os.environ["XLA_FLAGS"] = xla_flags(local_devices)
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(REPO))
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nproc > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)


def eval_trainer_config(data_root: Path | str, proc: Path | str, tasks: Sequence[str], **eval_overrides: Any) -> Any:
    """A trainer config for embedding tests: the tiny random model (seed 0), the synthetic corpus at ``data_root``,
    processor files in ``proc``, 96-token sequences, 64 patches per image, batches of 8, shards of 40."""
    from mmret.recipe import as_trainer_config

    ev = {"tasks": list(tasks), "pools": ["local"], "batch_size": 8, "shard_size": 40, **eval_overrides}
    return as_trainer_config(
        {
            "model": {"preset": "tiny", "seed": 0},
            "data": {
                "root": str(data_root),
                "processor_dir": str(proc),
                "processor": {"max_pixels": 64 * 28 * 28, "max_text_tokens": 64},
                "pipeline": {
                    "batch_size": 8,
                    "max_query_length": 96,
                    "max_candidate_length": 96,
                    "max_query_patches": 8 * 64,
                    "max_candidate_patches": 8 * 64,
                },
            },
            "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
            "eval": ev,
        }
    )


def read_scalars(logdir: Path | str) -> dict[str, list[tuple[int, float]]]:
    """The scalars under ``logdir`` as TensorBoard itself reads them (its ``EventAccumulator``, every point
    kept, a restarted run's orphaned points purged): tag -> [(step, value), ...] in the order written."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()[ea.SCALARS]}


def run_at_once(*commands: Sequence[str], timeout: float = 600, **popen: Any) -> list[Any]:
    """Run independent commands at the same time (each process mostly imports, on one core); their
    ``subprocess.CompletedProcess`` results (text stdout and stderr captured), in order."""
    import subprocess

    procs = [
        subprocess.Popen(list(c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen) for c in commands
    ]
    results = []
    for c, p in zip(commands, procs, strict=True):
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(list(c), p.returncode, out, err))
    return results


def run_trainer(
    config_file: Path | str, workdir: Path | str, *, devices: int, suite_flags: bool = True, timeout: float = 600
) -> Any:
    """``python -m mmret.train.trainer --config FILE --workdir DIR`` on ``devices`` simulated CPU devices
    (from the repository root; ``suite_flags`` as ``xla_flags``' ``suite``); its ``CompletedProcess`` (text
    output captured)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=xla_flags(devices, suite=suite_flags), JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "mmret.train.trainer", "--config", str(config_file), "--workdir", str(workdir)]
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=timeout)


def chromium() -> str | None:
    """The headless browser on PATH (Debian's ``chromium``), or None: under ``CI=true`` a missing browser fails
    the calling test (``.ci/run`` installs it), elsewhere it skips it with a one-line reason."""
    import os
    import shutil

    import pytest

    found = next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium on PATH (.ci/run installs Debian's chromium package)")
        pytest.skip("no chromium on PATH (apt-get install chromium to run this test)")
    return found


def thumbnails_loaded(page: Path, profile: Path) -> tuple[int, int]:
    """Open ``page`` in headless Chromium (a fresh profile in ``profile``) and read the retrieval page's own count
    of the thumbnails the browser decoded (``data-loaded`` on ``<body>``: loaded, total)."""
    import re
    import subprocess

    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
    ]
    r = subprocess.run([chromium(), *flags, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    found = re.search(r'data-loaded="(\d+)/(\d+)"', r.stdout)
    assert found, r.stdout[:2000]
    return int(found.group(1)), int(found.group(2))
