"""Two processes on localhost (jax.distributed, gloo CPU collectives) agree with one process: three train
steps on the same global batch, and the embedding export of a corpus."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from mmret.data.mbeir import read_local_pool, read_queries
from mmret.eval.embed import Embeddings

WORKER = Path(__file__).with_name("_multihost_worker.py")
EMBED_WORKER = Path(__file__).with_name("_multihost_embed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(worker: Path, nproc: int, devices_per_process: int, *args: str) -> list[str]:
    """Run ``worker`` as ``nproc`` processes of one jax.distributed job; their outputs (each must exit 0)."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), str(nproc), port, str(devices_per_process), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(nproc)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_processes_agree_with_one(processor_dir, tmp_path):
    outs = run_workers(WORKER, 2, 2, str(processor_dir), str(tmp_path))
    assert "devices 4" in outs[0]
    run_workers(WORKER, 1, 4, str(processor_dir), str(tmp_path))
    two, one = np.load(tmp_path / "result_2.npz"), np.load(tmp_path / "result_1.npz")
    assert one["losses"][0] > 0.1 and one["losses"][2] < one["losses"][0]  # it really trains
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    keys = [k for k in one.files if k != "losses"]
    assert len(keys) > 10 and sorted(keys) == sorted(k for k in two.files if k != "losses")
    for k in keys:
        np.testing.assert_allclose(two[k], one[k], atol=1e-5, err_msg=k)


def test_two_process_embedding_export_equals_one_process(processor_dir, tiny_mbeir, tmp_path):
    """Each host embeds its contiguous part of every shard; the primary writes the reassembled shards."""
    inputs = (str(tiny_mbeir), str(processor_dir))  # the session's (tests/conftest.py)
    outs = run_workers(EMBED_WORKER, 2, 2, *inputs, str(tmp_path / "two"))
    assert all("devices 4" in out for out in outs)
    run_workers(EMBED_WORKER, 1, 4, *inputs, str(tmp_path / "one"))
    two, one = Embeddings(tmp_path / "two"), Embeddings(tmp_path / "one")
    for task in ("cirr_task7", "webqa_task1"):
        qids, q2 = two.queries(task)
        assert qids == [q.qid for q in read_queries(tiny_mbeir, "test", task)]
        assert qids == one.queries(task)[0]
        np.testing.assert_allclose(q2.astype(np.float32), one.queries(task)[1].astype(np.float32), atol=1e-3)
        dids, c2 = two.local_pool(task)
        assert dids == list(read_local_pool(tiny_mbeir, task)) and len(dids) > 80  # several shards
        assert dids == one.local_pool(task)[0]
        np.testing.assert_allclose(c2.astype(np.float32), one.local_pool(task)[1].astype(np.float32), atol=1e-3)
        assert np.abs(np.linalg.norm(c2.astype(np.float32), axis=1) - 1).max() < 1e-2  # real rows, not padding
