"""Roots and outputs through etils.epath: every one works named as an ``epath.Path`` or as a string (on
local paths here), and a ``gs://`` path passes through unchanged (no network needed to build one)."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from helpers import load_tool

from mmret.atomic_dir import OutputExistsError, absolute, as_path, atomic_output_dir, is_local, stamp, write_atomic
from mmret.data import mbeir
from mmret.data.bad_records import BadRecords
from mmret.data.negatives import read_negatives, write_negatives
from mmret.data.stores import ArrayRecordStore, EvalStore, RawStore, _Reader
from mmret.data.synthetic import write_synthetic_mbeir
from mmret.data.tfds_mbeir import QUERIES, build_tfds_mbeir, dataset_dir
from mmret.eval.embed import (
    GROUP,
    MANIFEST,
    Embeddings,
    file_stamps,
    replace_stale,
    shard_name,
    stale_reason,
    write_json,
)
from mmret.eval.evaluate import evaluate
from mmret.eval.index import ExactIndex, ScannIndex, build_index, load_index
from mmret.eval.metrics import read_trec
from mmret.eval.report import read_report
from mmret.eval.run import eval_dir
from mmret.recipe import SearchConfig

TASK = "cirr_task7"
BIG = 10**9  # a decode cap that lets every synthetic image through

#: A path named as an epath.Path, or as a plain string.
KINDS: dict[str, Callable[[Path], epath.Path | str]] = {"epath": epath.Path, "str": str}


@pytest.fixture(params=sorted(KINDS))
def named(request: pytest.FixtureRequest) -> Callable[[Path], epath.Path | str]:
    return KINDS[request.param]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "mbeir"
    write_synthetic_mbeir(out, scale="tiny", seed=0)
    return out


# ------------------------------------------------------------------------------------------- local paths


def test_synthetic_corpus_and_raw_store(root: Path, tmp_path: Path, named) -> None:
    """The corpus written at a named path is the same bytes, and RawStore reads it from a named root."""
    summary = write_synthetic_mbeir(named(tmp_path / "mbeir"), scale="tiny", seed=0)
    assert isinstance(summary.out, epath.Path) and str(summary.out) == str(tmp_path / "mbeir")
    name = mbeir.query_path(root, "test", TASK).relative_to(root)
    assert (tmp_path / "mbeir" / name).read_bytes() == (root / name).read_bytes()
    store = RawStore(named(root), "test", tasks=[TASK])
    want = RawStore(root, "test", tasks=[TASK])
    assert isinstance(store.root, epath.Path) and len(store.queries) > 0
    examples = [store.query_example(q, seed=0) for q in store.queries]
    assert examples == [want.query_example(q, seed=0) for q in want.queries]
    key = next(q.image_path for q in store.queries if q.image_path)
    assert store.image(key, max_pixels=BIG).size == want.image(key, max_pixels=BIG).size
    ev = EvalStore(named(root), "test", [TASK], ["local"], BadRecords("error"))
    assert ev.queries == want.queries
    negatives = tmp_path / "negatives.jsonl"
    write_negatives(named(negatives), [(want.queries[0].qid, [d for d in want.pool][:2])])
    assert read_negatives(named(negatives), pool=want.pool) == {want.queries[0].qid: tuple(list(want.pool)[:2])}


def test_array_record_build(root: Path, tmp_path: Path, named) -> None:
    out = tmp_path / "build"
    report = build_tfds_mbeir(named(root), named(out), splits=["test"], tasks=[TASK])
    assert isinstance(report.out, epath.Path) and str(report.out) == str(out)
    manifest = json.loads((out / "mmret_build.json").read_text())
    assert manifest["source_root"] == str(root.absolute())
    assert manifest["splits"]["test"]["pool_files"] == [f"cand_pool/local/mbeir_{TASK}_cand_pool.jsonl"]
    ar, raw = ArrayRecordStore(named(out), "test"), RawStore(root, "test", tasks=[TASK])
    assert list(ar.queries) == list(raw.queries) and list(ar.pool) == list(raw.pool)
    ar2 = pickle.loads(pickle.dumps(ar))  # as grain workers get it
    assert ar2.candidate_part(raw.queries[0].pos_cand_list[0]) == raw.candidate_part(raw.queries[0].pos_cand_list[0])


@pytest.mark.parametrize("method", ["exact", "scann"])
def test_index_save_and_load(tmp_path: Path, named, method: str) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:5]
    cfg = SearchConfig(method=method, num_leaves=4, num_leaves_to_search=4)
    index = build_index(vectors, cfg, k=5)
    assert isinstance(index, ExactIndex if method == "exact" else ScannIndex)
    index.save(named(tmp_path / "index"))
    loaded = load_index(named(tmp_path / "index"))
    assert type(loaded) is type(index)
    for got, want in zip(loaded.search(queries, 5), index.search(queries, 5), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.search(queries, 1)[0][:, 0], np.arange(5))  # each query finds itself
    if method == "exact":
        mapped = ExactIndex.load(named(tmp_path / "index"), mmap=True)
        assert isinstance(mapped.vectors, np.memmap)  # a local index is memory-mapped


def _write_embeddings(out: epath.Path | str, root: Path) -> tuple[list[str], list[str]]:
    """An embeddings directory of one task through embed's writers: its queries and local pool, each
    query's vector equal to its first positive's (so every query ranks a positive first)."""
    queries = mbeir.read_queries(root, "test", TASK)
    dids = list(mbeir.read_local_pool(root, TASK, "test"))
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((len(dids), 16)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    q = np.stack([pool[dids.index(x.pos_cand_list[0])] for x in queries])
    out = as_path(out)
    write_json(out / MANIFEST, {"version": 2, "split": "test", "tasks": [TASK], "pools": ["local"], "dim": 16})
    for name, ids, vectors in (("queries/" + TASK, [x.qid for x in queries], q), ("pools/local/" + TASK, dids, pool)):
        write_json(out / name / GROUP, {"count": len(ids), "shards": 1})
        arrays = {"embeddings": vectors.astype(np.float16), "ids": np.asarray(ids)}
        write_atomic(out / name / shard_name(0), lambda f, a=arrays: np.savez(f, **a))
    return [x.qid for x in queries], dids


def test_embeddings_directory_and_report(root: Path, tmp_path: Path, named) -> None:
    qids, dids = _write_embeddings(named(tmp_path / "emb"), root)
    emb = Embeddings(named(tmp_path / "emb"))
    got_qids, vectors = emb.queries(TASK)
    assert got_qids == qids and vectors.shape == (len(qids), 16) and vectors.dtype == np.float16
    assert emb.local_pool(TASK)[0] == dids
    assert stale_reason(named(tmp_path / "emb"), {"version": 2}) == "pools, split, tasks"
    report = evaluate(named(tmp_path / "emb"), named(root), "local", named(tmp_path / "report"))
    assert report["tasks"][TASK]["recall@1"] == 100.0
    assert report["extra"]["embeddings"] == str(tmp_path / "emb") and report["fingerprint"]["mbeir_root"] == str(root)
    assert read_report(named(tmp_path / "report")) == json.loads((tmp_path / "report" / "report.json").read_text())
    trec = read_trec(named(tmp_path / "report" / f"{TASK}.trec"))
    assert sorted(trec) == sorted(qids)
    stamps = file_stamps(named(root), [mbeir.query_path(named(root), "test", TASK)])
    path = mbeir.query_path(root, "test", TASK)
    assert stamps == {f"query/test/mbeir_{TASK}_test.jsonl": [os.stat(path).st_size, os.stat(path).st_mtime_ns]}


def test_atomic_writer(tmp_path: Path, named) -> None:
    path = tmp_path / "sub" / "file.bin"
    write_atomic(named(path), b"old")
    assert path.read_bytes() == b"old"

    def dying(f) -> None:
        f.write(b"partial")
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        write_atomic(named(path), dying)
    assert path.read_bytes() == b"old" and os.listdir(path.parent) == ["file.bin"]  # no temporary left
    out = tmp_path / "dir"
    with atomic_output_dir(named(out)) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(OutputExistsError):
        with atomic_output_dir(named(out)):
            pass
    with pytest.raises(RuntimeError), atomic_output_dir(named(out), force=True) as tmp:
        (tmp / "b.txt").write_text("b")
        raise RuntimeError("stop")
    assert sorted(os.listdir(out)) == ["a.txt"] and sorted(os.listdir(tmp_path)) == ["dir", "sub"]
    with atomic_output_dir(named(out), force=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(os.listdir(out)) == ["b.txt"]


def test_local_paths_keep_pathlib_semantics(tmp_path: Path) -> None:
    """absolute() and stamp() of a local path are pathlib's and os.stat's (nanosecond mtimes)."""
    f = tmp_path / "f.txt"
    f.write_text("x")
    os.utime(f, ns=(1, 1_700_000_000_123_456_789))
    assert stamp(f) == stamp(epath.Path(f)) == [1, 1_700_000_000_123_456_789]
    assert absolute("a/../b") == str(Path("a/../b").absolute()) and is_local(tmp_path) and is_local("a/b")


# ---------------------------------------------------------------------------------------------- gs paths


def test_gs_paths_pass_through_unchanged() -> None:
    root = "gs://bucket/mbeir"
    built = [
        mbeir.query_path(root, "test", TASK),
        mbeir.local_pool_path(root, "mscoco_task0", "test"),
        mbeir.global_pool_path(root, "test"),
        mbeir.qrels_path(root, "test", TASK),
        mbeir.union_query_path(root, "train"),
        mbeir.instructions_path(root),
        mbeir.query_path(epath.Path(root), "test", TASK),
    ]
    for path in built:
        assert isinstance(path, epath.Path) and str(path).startswith("gs://bucket/mbeir/"), path
    assert str(built[0]) == f"gs://bucket/mbeir/query/test/mbeir_{TASK}_test.jsonl"
    assert str(dataset_dir("gs://bucket/build", QUERIES)) == "gs://bucket/build/mbeir_queries/1.0.0"
    assert str(eval_dir("gs://bucket/run", 3)) == "gs://bucket/run/eval/3"
    assert str(eval_dir("gs://bucket/run", 3, "val")) == "gs://bucket/run/eval/val/3"  # beside the test run
    assert not is_local(root) and absolute(root) == root and absolute(epath.Path(root)) == root
    assert str(pickle.loads(pickle.dumps(epath.Path(root)))) == root  # stores travel to grain workers
    reader = pickle.loads(pickle.dumps(_Reader(epath.Path("gs://bucket/build"), "train", 4)))
    assert str(reader.build) == "gs://bucket/build"


def test_tools_take_gs_paths() -> None:
    """The command lines parse a ``gs://`` root or output into an epath.Path, not a local ``gs:/`` one."""
    embed = load_tool("embed").build_parser().parse_args(["--workdir", "gs://b/run", "--out", "gs://b/emb"])
    scann = (
        load_tool("scann_eval")
        .build_parser()
        .parse_args(
            ["--embeddings", "gs://b/emb", "--mbeir_root", "gs://b/mbeir", "--pool", "local", "--out", "gs://b/rep"]
        )
    )
    tfds = load_tool("build_tfds_mbeir")._parse_args(["--mbeir_root", "gs://b/mbeir", "--out", "gs://b/build"])
    synthetic = load_tool("make_synthetic_mbeir")._parse_args(["--out", "gs://b/syn"])
    got = [embed.workdir, embed.out, scann.embeddings, scann.out, tfds.mbeir_root, tfds.out, synthetic.out]
    assert [str(p) for p in got] == ["gs://b/run", "gs://b/emb", "gs://b/emb", "gs://b/rep"] + [
        "gs://b/mbeir",
        "gs://b/build",
        "gs://b/syn",
    ]
    assert all(isinstance(p, epath.Path) for p in got)


# ------------------------------------------------- on a fake object store (the bucket fixture of conftest.py)


def test_a_corpus_build_and_evaluation_on_an_object_store(root: Path, bucket: Path) -> None:
    """Everything a run writes, on ``gs://`` (faked): the synthetic corpus, its ArrayRecord build, an index,
    an embeddings directory, its stale replacement and a report; read back from there."""
    summary = write_synthetic_mbeir("gs://bucket/mbeir", scale="tiny", seed=0)
    assert str(summary.out) == "gs://bucket/mbeir" and sorted(os.listdir(bucket)) == ["mbeir"]
    name = mbeir.query_path(root, "test", TASK).relative_to(root)
    assert (bucket / "mbeir" / name).read_bytes() == (root / name).read_bytes()
    store, want = RawStore("gs://bucket/mbeir", "test", tasks=[TASK]), RawStore(root, "test", tasks=[TASK])
    assert [store.query_example(q, seed=0) for q in store.queries] == [
        want.query_example(q, seed=0) for q in want.queries
    ]
    key = next(q.image_path for q in store.queries if q.image_path)
    np.testing.assert_array_equal(
        np.asarray(store.image(key, max_pixels=BIG)), np.asarray(want.image(key, max_pixels=BIG))
    )

    report = build_tfds_mbeir("gs://bucket/mbeir", "gs://bucket/build", splits=["test"], tasks=[TASK], num_shards=2)
    assert str(report.out) == "gs://bucket/build"
    shards = sorted(p for p in os.listdir(bucket / "build" / "mbeir_queries" / "1.0.0") if "array_record" in p)
    assert shards == [f"mbeir_queries-test.array_record-0000{i}-of-00002" for i in range(2)]
    manifest = json.loads((bucket / "build" / "mmret_build.json").read_text())
    assert manifest["source_root"] == "gs://bucket/mbeir"
    assert manifest["splits"]["test"]["pool_files"] == [f"cand_pool/local/mbeir_{TASK}_cand_pool.jsonl"]
    # array_record reads local files only: the build, copied down, is the one a local root gives
    ar = ArrayRecordStore(bucket / "build", "test")
    assert list(ar.queries) == list(want.queries) and list(ar.pool) == list(want.pool)

    vectors = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    for method in ("exact", "scann"):
        index = build_index(vectors, SearchConfig(method=method, num_leaves=4, num_leaves_to_search=4), k=5)
        index.save(f"gs://bucket/index-{method}")
        loaded = load_index(f"gs://bucket/index-{method}")
        assert type(loaded) is type(index)
        for got, expected in zip(loaded.search(vectors[:5], 5), index.search(vectors[:5], 5), strict=True):
            np.testing.assert_array_equal(got, expected)
        with pytest.raises(OutputExistsError):
            index.save(f"gs://bucket/index-{method}")

    qids, _ = _write_embeddings("gs://bucket/emb", root)
    assert Embeddings("gs://bucket/emb").queries(TASK)[0] == qids
    report = evaluate("gs://bucket/emb", "gs://bucket/mbeir", "local", "gs://bucket/report")
    assert report["tasks"][TASK]["recall@1"] == 100.0 and read_report("gs://bucket/report") == report
    assert (
        report["extra"]["embeddings"] == "gs://bucket/emb"
        and report["fingerprint"]["mbeir_root"] == "gs://bucket/mbeir"
    )
    assert sorted(read_trec(f"gs://bucket/report/{TASK}.trec")) == sorted(qids)
    qrels = bucket / "mbeir" / "qrels" / "test" / f"mbeir_{TASK}_test_qrels.txt"
    whole_seconds = int(qrels.stat().st_mtime) * 10**9  # an object store's stat has no finer mtime
    want_stamps = {f"qrels/test/mbeir_{TASK}_test_qrels.txt": [qrels.stat().st_size, whole_seconds]}
    assert report["fingerprint"]["qrels_files"] == want_stamps
    replace_stale("gs://bucket/emb", "tasks")
    assert os.listdir(bucket / "emb") == []


def test_atomic_writer_on_an_object_store(bucket: Path) -> None:
    write_atomic("gs://bucket/sub/file.bin", b"old")
    assert (bucket / "sub" / "file.bin").read_bytes() == b"old"
    with pytest.raises(RuntimeError):
        write_atomic("gs://bucket/sub/file.bin", lambda f: f.write(b"partial") and _stop())
    assert (bucket / "sub" / "file.bin").read_bytes() == b"old" and os.listdir(bucket / "sub") == ["file.bin"]
    with atomic_output_dir("gs://bucket/dir") as tmp:
        assert str(tmp).startswith("gs://bucket/.dir.tmp-")
        (tmp / "a.txt").write_text("a")
    with pytest.raises(RuntimeError), atomic_output_dir("gs://bucket/dir", force=True) as tmp:
        (tmp / "b.txt").write_text("b")
        _stop()
    assert os.listdir(bucket / "dir") == ["a.txt"] and sorted(os.listdir(bucket)) == ["dir", "sub"]
    with atomic_output_dir("gs://bucket/dir", force=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert os.listdir(bucket / "dir") == ["b.txt"] and sorted(os.listdir(bucket)) == ["dir", "sub"]


def _stop() -> None:
    raise RuntimeError("stop")


# ------------------------------------------------------------------------------ a run's workdir


def test_metric_files_of_a_run_on_an_object_store(bucket: Path) -> None:
    """metrics.jsonl and the TensorBoard event file land in ``gs://`` whole after each log point (an object
    store has no append), and a resumed writer keeps the earlier records up to its step."""
    from helpers import read_scalars

    from mmret.train.metrics import MetricWriters

    w = MetricWriters("gs://bucket/run", total_steps=4, out=io.StringIO())
    w.write(1, {"loss": 2.0})
    lines = (bucket / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 2.0}]
    assert read_scalars(bucket / "run" / "tb") == {"loss": [(1, 2.0)]}  # on the store before close
    w.write(2, {"loss": 1.0})
    w.close()
    w = MetricWriters("gs://bucket/run", total_steps=4, resume_step=1, out=io.StringIO())
    w.write(2, {"loss": 1.5})
    w.close()
    records = [json.loads(line) for line in (bucket / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert len(os.listdir(bucket / "run" / "tb")) == 2


def test_a_run_trains_into_an_epath_workdir(tmp_path: Path, capsys) -> None:
    from test_tasks import LeastSquares, config

    from mmret.checkpoints import steps
    from mmret.train.trainer import train

    workdir = epath.Path(tmp_path) / "run"
    summary = train(config(4), workdir, task=LeastSquares())
    assert summary["final_step"] == 4 and steps(workdir) == [4] and steps(str(workdir)) == [4]
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert train(config(6), str(workdir), task=LeastSquares())["final_step"] == 6  # resumes from a string
    assert "resuming from step 4" in capsys.readouterr().out
