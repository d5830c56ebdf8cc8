"""Two processes on localhost (jax.distributed, gloo CPU collectives) agree with one process: three train
steps on the same global batch, the embedding export of a corpus, and hard-negative mining."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from mmret.data.mbeir import read_local_pool, read_queries
from mmret.eval.embed import Embeddings

WORKER = Path(__file__).with_name("_multihost_worker.py")
EMBED_WORKER = Path(__file__).with_name("_multihost_embed_worker.py")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_jobs(*jobs: tuple) -> list[list[str]]:
    """Run each job ``(worker, nproc, devices_per_process, *args)`` as ``nproc`` processes of one
    jax.distributed job (on its own port), all jobs at the same time: the jobs are independent, and the
    processes spend most of their time importing and compiling, one core each. Each job's outputs (every
    process must exit 0)."""

    def start(worker: Path, pid: int, nproc: int, port: int, devices_per_process: int, *args) -> subprocess.Popen:
        cmd = [sys.executable, str(worker), str(pid), str(nproc), str(port), str(devices_per_process), *map(str, args)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    started = [
        [start(worker, pid, nproc, port, *rest) for pid in range(nproc)]
        for (worker, nproc, *rest), port in zip(jobs, free_ports(len(jobs)), strict=True)
    ]
    outs = [[p.communicate(timeout=600)[0] for p in procs] for procs in started]
    for procs, job_outs in zip(started, outs, strict=True):
        for p, out in zip(procs, job_outs, strict=True):
            assert p.returncode == 0, out[-3000:]
    return outs


def test_two_processes_agree_with_one(processor_dir, tmp_path):
    two_outs, one_outs = run_jobs((WORKER, 2, 2, processor_dir, tmp_path), (WORKER, 1, 4, processor_dir, tmp_path))
    assert all("devices 4" in out for out in two_outs + one_outs)
    two, one = np.load(tmp_path / "result_2.npz"), np.load(tmp_path / "result_1.npz")
    assert one["losses"][0] > 0.1 and one["losses"][2] < one["losses"][0]  # it really trains
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    keys = [k for k in one.files if k != "losses"]
    assert len(keys) > 10 and sorted(keys) == sorted(k for k in two.files if k != "losses")
    for k in keys:
        np.testing.assert_allclose(two[k], one[k], atol=1e-5, err_msg=k)


def test_two_process_embedding_export_equals_one_process(processor_dir, tiny_mbeir, tmp_path):
    """Each host embeds its contiguous part of every shard; the primary writes the reassembled shards. Then
    mining (each host embeds its part of the training queries and pools; the primary searches and writes)."""
    inputs = (str(tiny_mbeir), str(processor_dir))  # the session's (tests/conftest.py)
    two_outs, one_outs = run_jobs(
        (EMBED_WORKER, 2, 2, *inputs, tmp_path / "two"), (EMBED_WORKER, 1, 4, *inputs, tmp_path / "one")
    )
    assert all("devices 4" in out for out in two_outs + one_outs)
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
    # Mining: one file, written once, with every training query of the two tasks and the same negatives as one
    # process's (a few pool embeddings differ in the last float16 bit, so a near tie may swap: scores within 1e-3).
    mined = {}
    for name in ("two", "one"):
        lines = (tmp_path / name / "mined" / "negatives.jsonl").read_text().splitlines()
        mined[name] = {r["qid"]: r for r in map(json.loads, lines)}
        assert len(mined[name]) == len(lines)  # one line per query
    train_qids = {q.qid for q in read_queries(tiny_mbeir, "train", "cirr_task7")}  # the task the workers mine
    assert set(mined["two"]) == set(mined["one"]) == train_qids
    for qid, two_rec in mined["two"].items():
        one_rec = mined["one"][qid]
        assert len(two_rec["neg_cand_list"]) == 3
        pairs = zip(
            two_rec["neg_cand_list"], one_rec["neg_cand_list"], two_rec["scores"], one_rec["scores"], strict=True
        )
        for a, b, sa, sb in pairs:
            assert a == b or abs(sa - sb) < 1e-3, (qid, two_rec, one_rec)
    same = sum(mined["two"][q]["neg_cand_list"] == mined["one"][q]["neg_cand_list"] for q in train_qids)
    assert same >= 0.9 * len(train_qids)
    summary = json.loads((tmp_path / "two" / "mined" / "summary.json").read_text())
    assert summary["queries"] == len(train_qids) and summary["negatives"] == 3 * len(train_qids)


def test_exchanged_positive_mask_marks_a_positive_another_process_holds():
    """The global mask built from every process's candidate ids: where each process's positives are its own it
    equals the local-only layout; a copy of a query's positive on the other process is marked as well."""
    from mmret.tasks.bi_encoder.task import exchanged_positive_mask, global_positive_mask, id_hashes

    # 2 processes, 2 GradCache chunks of 1 query with 2 candidates each (the positive first)
    dids = [["a", "x", "b", "y"], ["c", "z", "a", "w"]]  # process 1's last chunk holds a copy of "a"
    positives = [[frozenset({"a"}), frozenset({"b"})], [frozenset({"c"}), frozenset({"a"})]]
    every = np.stack([id_hashes(d) for d in dids])
    for pid in (0, 1):
        local = np.array([[d in pos for d in dids[pid]] for pos in positives[pid]])
        exchanged = exchanged_positive_mask(positives[pid], every, n_chunks=2)
        old = global_positive_mask(local, 2, pid, 2)
        assert exchanged.shape == old.shape == (2, 1, 2, 4)
        flat, flat_old = exchanged.reshape(2, 8), old.reshape(2, 8)
        # global candidate order: chunk 0 (process 0: a x, process 1: c z), chunk 1 (process 0: b y, process 1: a w)
        order = ["a", "x", "c", "z", "b", "y", "a", "w"]
        expect = np.array([[d in pos for d in order] for pos in positives[pid]])
        np.testing.assert_array_equal(flat, expect)
        assert (flat >= flat_old).all()  # the local-only layout misses only the other process's copies
    # process 0's query "a": both copies marked, the other process's among them
    assert exchanged_positive_mask(positives[0], every, 2).reshape(2, 8)[0].tolist() == [1, 0, 0, 0, 0, 0, 1, 0]
