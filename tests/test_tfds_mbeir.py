"""The TFDS ArrayRecord build of an M-BEIR root: read back by tfds without TensorFlow, the same records,
images and training batches as the raw root, and bad images reported or skipped while building."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from helpers import load_tool  # noqa: E402
from PIL import Image

from mmret.data.bad_records import BadRecordError, BadRecords
from mmret.data.mbeir import read_pool, read_queries
from mmret.data.negatives import read_negatives, write_negatives
from mmret.data.pipeline import PipelineConfig, query_dataset, train_dataset
from mmret.data.processor import Processor, ProcessorConfig
from mmret.data.stores import ArrayRecordStore, RawStore
from mmret.data.tfds_mbeir import (
    CANDIDATES,
    QUERIES,
    BuildError,
    build_tfds_mbeir,
    dataset_dir,
)

REPO = Path(__file__).resolve().parents[1]
CFG = PipelineConfig(
    batch_size=4,
    max_query_length=160,
    max_candidate_length=160,
    max_query_patches=4 * 256,
    max_candidate_patches=4 * 256,
)
BIG = 10**9  # a decode cap that lets every synthetic image through


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return load_tool("build_tfds_mbeir")


@pytest.fixture(scope="module")
def root(tiny_mbeir: Path) -> Path:
    return tiny_mbeir  # the session's tiny corpus (tests/conftest.py): read only, copied where a test breaks it


@pytest.fixture(scope="module")
def negatives(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A negatives file for the train queries: six pool candidates per query that are not positives."""
    pool = read_pool(root / "cand_pool" / "global" / "mbeir_union_train_cand_pool.jsonl")
    dids = sorted(pool)
    rng = np.random.default_rng(0)
    negs = {}
    for q in read_queries(root, "train"):
        negs[q.qid] = [d for d in rng.choice(dids, 6, replace=False) if d not in q.pos_cand_list]
    path = tmp_path_factory.mktemp("negs") / "negatives.jsonl"
    write_negatives(path, negs.items())
    return path


@pytest.fixture(scope="module")
def build(tool: ModuleType, root: Path, negatives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tfds") / "build"
    argv = ["--mbeir_root", str(root), "--out", str(out), "--num_shards", "3", "--negatives", str(negatives)]
    assert tool.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def processor(processor_dir: Path) -> Processor:
    return Processor(processor_dir, ProcessorConfig(max_pixels=64 * 28 * 28))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batch(a, b) -> None:
    for part in ("query", "candidates"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            np.testing.assert_array_equal(a[part][k], b[part][k], err_msg=f"{part}.{k}")
    np.testing.assert_array_equal(a["positive_mask"], b["positive_mask"])
    assert a["meta"]["qids"] == b["meta"]["qids"] and a["meta"]["dids"] == b["meta"]["dids"]


# --------------------------------------------------------------------------------------------- the layout


def test_layout_is_a_sharded_tfds_directory(build: Path) -> None:
    manifest = json.loads((build / "mmret_build.json").read_text())
    assert list(manifest["splits"]) == ["train", "val", "test"]
    for name in (QUERIES, CANDIDATES):
        d = dataset_dir(build, name)
        assert (d / "dataset_info.json").is_file() and (d / "features.json").is_file()
        info = json.loads((d / "dataset_info.json").read_text())
        assert info["fileFormat"] == "array_record"
        for split in info["splits"]:
            shards = sorted(p.name for p in d.glob(f"{name}-{split['name']}.array_record-*"))
            assert shards == [f"{name}-{split['name']}.array_record-{i:05d}-of-00003" for i in range(3)]
    assert (build / "instructions" / "query_instructions.tsv").is_file()
    assert (build / "negatives" / "train.jsonl").is_file()
    assert not list(build.rglob("*.pkl")) and not list(build.rglob("*.partial"))
    for split in ("train", "val", "test"):  # index tables load without pickle
        for f in (build / "index" / split).glob("*.npy"):
            np.load(f, allow_pickle=False)


def test_tfds_reads_the_build_without_tensorflow(build: Path, root: Path) -> None:
    """``tfds.data_source`` and ``builder_from_directory(...).as_data_source`` in a fresh process, no TensorFlow."""
    script = textwrap.dedent(
        f"""
        import json, sys
        import importlib.util
        tf_installed = importlib.util.find_spec("tensorflow") is not None
        import tensorflow_datasets as tfds
        ds = tfds.data_source("{QUERIES}", data_dir={str(build)!r}, split="train")
        cands = tfds.builder_from_directory({str(dataset_dir(build, CANDIDATES))!r}).as_data_source(split="test")
        out = {{"n": len(ds), "first": {{k: v.decode("latin-1") for k, v in ds[0].items()}}, "m": len(cands),
               "cand": {{k: v.decode("latin-1") for k, v in cands[len(cands) - 1].items()}}}}
        out["tf_installed"], out["tf_imported"] = tf_installed, "tensorflow" in sys.modules
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tf_installed"] or not got["tf_imported"]  # the environment has no TensorFlow: none was needed
    union = "query/union_train/mbeir_union_up_train.jsonl"  # train is built from the union file
    lines = [json.loads(line) for line in (root / union).read_text().splitlines()]
    assert got["n"] == len(lines)
    first = got["first"]
    assert json.loads(first["record"]) == lines[0] and first["id"] == lines[0]["qid"]
    assert first["source"] == f"{union}:1"
    assert first["image"] == (
        b"" if lines[0]["query_img_path"] is None else (root / lines[0]["query_img_path"]).read_bytes()
    ).decode("latin-1")
    pool_file = root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"
    last = json.loads(pool_file.read_text().splitlines()[-1])
    assert got["m"] == len(read_pool(pool_file))
    assert got["cand"]["id"] == last["did"]
    image = got["cand"]["image"].encode("latin-1")
    assert image == ((root / last["img_path"]).read_bytes() if last["img_path"] else b"")


# ------------------------------------------------------------------------------------ the store and batches


@pytest.mark.parametrize("split", ["train", "test"])
def test_store_has_the_raw_records_and_pixels(build: Path, root: Path, split: str) -> None:
    raw, ar = RawStore(root, split), ArrayRecordStore(build, split)
    assert len(ar.queries) == len(raw.queries)
    assert list(ar.queries) == list(raw.queries)
    assert ar.queries[-1] == raw.queries[-1] and ar.queries[3:7] == raw.queries[3:7]
    assert list(ar.pool) == list(raw.pool)
    assert all(ar.candidate(d) == c for d, c in raw.pool.items())
    assert ar.instructions == raw.instructions
    paths = {q.image_path for q in raw.queries} | {c.image_path for c in raw.pool.values()}
    for path in sorted(p for p in paths if p is not None):
        a = np.asarray(raw.image(path, max_pixels=BIG))
        b = np.asarray(ar.image(path, max_pixels=BIG))  # mostly through the index, not the cache
        np.testing.assert_array_equal(a, b, err_msg=path)
    with pytest.raises(KeyError):
        ar.candidate("9:123456789")
    assert "9:123456789" not in ar.pool


def test_store_with_tasks_matches_raw(build: Path, root: Path) -> None:
    tasks = ["cirr_task7", "mscoco_task0", "webqa_task1"]
    raw, ar = RawStore(root, "test", tasks), ArrayRecordStore(build, "test", tasks)
    assert list(ar.queries) == list(raw.queries)
    with pytest.raises(BuildError, match="not in the test build"):
        ArrayRecordStore(build, "test", ["cirr_task8"])


def test_build_of_some_tasks_reads_their_local_pools(root: Path, tmp_path: Path) -> None:
    tasks = ["webqa_task1", "mscoco_task0"]  # text -> text (no image at all) and a test pool with its own name
    report = build_tfds_mbeir(root, tmp_path / "b", splits=["test"], tasks=tasks)
    manifest = json.loads((tmp_path / "b" / "mmret_build.json").read_text())
    assert manifest["splits"]["test"]["pool_files"] == [
        "cand_pool/local/mbeir_webqa_task1_cand_pool.jsonl",
        "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl",
    ]
    raw, ar = RawStore(root, "test", tasks), ArrayRecordStore(tmp_path / "b", "test")
    assert list(ar.queries) == list(raw.queries) and report.counts["test"]["queries"] == len(raw.queries)
    assert list(ar.pool) == list(raw.pool) and all(ar.candidate(d) == c for d, c in raw.pool.items())


def test_training_batches_are_identical(build: Path, root: Path, processor: Processor) -> None:
    raw = train_dataset(RawStore(root, "train"), processor, CFG, process_index=0, process_count=1)
    ar = train_dataset(ArrayRecordStore(build, "train"), processor, CFG, process_index=0, process_count=1)
    for a, b in zip(_take(iter(raw), 4), _take(iter(ar), 4), strict=True):
        _assert_same_batch(a, b)


def test_batches_with_negatives_and_workers_are_identical(
    build: Path, root: Path, negatives: Path, processor: Processor
) -> None:
    cfg = PipelineConfig(**{**CFG.__dict__, "num_negatives": 2})
    raw_store = RawStore(root, "train", negatives_file=negatives)
    ar_store = ArrayRecordStore(build, "train", negatives_file=build / "negatives" / "train.jsonl")
    assert dict(ar_store.negatives) == raw_store.negatives
    expected = _take(iter(train_dataset(raw_store, processor, cfg, process_index=0, process_count=1)), 3)
    workers = PipelineConfig(**{**cfg.__dict__, "num_workers": 2})  # the store is pickled into grain workers
    got = _take(iter(train_dataset(ar_store, processor, workers, process_index=0, process_count=1)), 3)
    for a, b in zip(expected, got, strict=True):
        _assert_same_batch(a, b)


def test_query_pipeline_is_identical(build: Path, root: Path, processor: Processor) -> None:
    kw = dict(batch_size=8, max_length=160, max_patches=8 * 256, process_index=0, process_count=1)
    raw = list(query_dataset(RawStore(root, "test", ["cirr_task7"]), processor, **kw))
    ar = list(query_dataset(ArrayRecordStore(build, "test", ["cirr_task7"]), processor, **kw))
    assert len(raw) == len(ar) == 3
    for a, b in zip(raw, ar, strict=True):
        assert a["meta"] == b["meta"]
        for k in a:
            if k != "meta":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_store_pickles_and_reopens(build: Path) -> None:
    store = ArrayRecordStore(build, "train")
    q = store.queries[5]
    copy = pickle.loads(pickle.dumps(store))
    assert copy.queries[5] == q and len(copy.pool) == len(store.pool)
    assert len(pickle.dumps(store)) < 200_000  # no records or images travel with it


# ------------------------------------------------------------------------------------------- bad input


def _bad_copy(root: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the corpus with one truncated, one missing and one oversized image (test split)."""
    copy = tmp_path / "mbeir"
    shutil.copytree(root, copy)
    test_pool = read_pool(copy / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl")
    paths = sorted({c.image_path for c in test_pool.values() if c.image_path})
    truncated, missing, big = paths[0], paths[1], paths[2]
    data = (copy / truncated).read_bytes()
    (copy / truncated).write_bytes(data[: len(data) // 2])
    (copy / missing).unlink()
    buf = io.BytesIO()
    Image.new("RGB", (2100, 2100)).save(buf, format="PNG")
    (copy / big).write_bytes(buf.getvalue())
    return copy, {"truncated": truncated, "missing": missing, "big": big}


def test_bad_image_stops_the_build_naming_file_and_line(tool: ModuleType, root: Path, tmp_path: Path, capsys) -> None:
    copy, bad = _bad_copy(root, tmp_path)
    out = tmp_path / "out"
    argv = ["--mbeir_root", str(copy), "--out", str(out), "--splits", "test", "--max_pixels", str(2000 * 2000)]
    assert tool.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad_image" in err
    assert "mbeir_union_test_cand_pool.jsonl:" in err and any(p in err for p in bad.values())
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written


def test_bad_images_are_skipped_and_counted(root: Path, tmp_path: Path) -> None:
    copy, bad = _bad_copy(root, tmp_path)
    out = tmp_path / "out"
    report = build_tfds_mbeir(copy, out, splits=["test"], on_bad_record="skip", max_pixels=2000 * 2000, num_workers=0)
    raw_pool = read_pool(copy / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl")
    hit = {d for d, c in raw_pool.items() if c.image_path in bad.values()}
    raw_queries = read_queries(copy, "test")
    hit_q = {q.qid for q in raw_queries if q.image_path in bad.values() or {*q.pos_cand_list, *q.neg_cand_list} & hit}
    assert report.bad.counts["bad_image"] >= len(hit) and report.bad.total == len(hit) + len(hit_q)
    assert report.counts["test"] == {"candidates": len(raw_pool) - len(hit), "queries": len(raw_queries) - len(hit_q)}
    assert "bad records skipped" in "\n".join(report.lines())
    manifest = json.loads((out / "mmret_build.json").read_text())
    assert manifest["bad_records"]["skipped"] == dict(report.bad.counts)
    store = ArrayRecordStore(out, "test")
    assert {d for d in store.pool} == set(raw_pool) - hit
    for q in store.queries:  # every kept query's positives and image survived
        assert all(d in store.pool for d in q.pos_cand_list)
        if q.image_path:
            store.image(q.image_path, max_pixels=2000 * 2000)


def test_invalid_record_is_counted_under_skip(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "mbeir"
    shutil.copytree(root, copy)
    qfile = copy / "query" / "union_val" / "mbeir_union_val.jsonl"  # what the val split is built from
    lines = qfile.read_text().splitlines()
    lines[2] = "{not json"
    qfile.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRecordError, match=r"mbeir_union_val.jsonl:3: invalid_json"):
        build_tfds_mbeir(copy, tmp_path / "a", splits=["val"])
    bad = BadRecords("skip")
    report = build_tfds_mbeir(copy, tmp_path / "b", splits=["val"], bad=bad)
    assert bad.counts == {"invalid_json": 1} and report.counts["val"]["queries"] == 128 - 1
    # the per-task files, untouched, build in full
    report = build_tfds_mbeir(copy, tmp_path / "c", splits=["val"], query_file="per_task")
    assert report.counts["val"]["queries"] == 128


def test_cli_usage_errors(tool: ModuleType, root: Path, build: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--mbeir_root", "--out", "--splits", "--tasks", "--num_shards", "--on_bad_record", "--force"):
        assert flag in help_text
    assert tool.main(["--mbeir_root", str(root), "--out", str(build)]) == 2  # exists, no --force
    assert "use --force" in capsys.readouterr().err
    assert tool.main(["--mbeir_root", str(root), "--out", str(tmp_path / "x"), "--splits", "dev"]) == 2
    assert tool.main(["--mbeir_root", str(root), "--out", str(tmp_path / "x"), "--tasks", "foo_task1"]) == 2
    assert tool.main(["--mbeir_root", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(SystemExit) as e:
        tool.main(["--mbeir_root", str(root), "--out", str(tmp_path / "x"), "--num_shards", "0"])
    assert e.value.code == 2


def test_negatives_are_validated_against_the_train_pool(build: Path) -> None:
    copied = read_negatives(build / "negatives" / "train.jsonl", pool=ArrayRecordStore(build, "train").pool)
    assert copied and all(len(v) >= 1 for v in copied.values())


def test_progress_is_shown_through_mmret_progress(tool: ModuleType, root: Path, tmp_path: Path, capsys) -> None:
    """One bar per split and dataset: as whole lines to ``log`` (closing at records read = total, with the
    records written), on stdout from the tool (stderr stays for errors), none with progress_every=0."""
    lines: list[str] = []
    report = build_tfds_mbeir(root, tmp_path / "a", splits=["test"], tasks=["webqa_task1"], log=lines.append)
    assert lines[0] == "split test:"
    for name, n in (("candidates", report.counts["test"]["candidates"]), ("queries", 24)):
        closing = [line for line in lines if line.startswith(f"test {name}")][-1]
        assert f"{n}/{n}" in closing and f"{n} written" in closing, closing
    quiet: list[str] = []
    build_tfds_mbeir(root, tmp_path / "b", splits=["test"], tasks=["webqa_task1"], log=quiet.append, progress_every=0)
    assert quiet == []
    argv = ["--mbeir_root", str(root), "--out", str(tmp_path / "c"), "--splits", "test", "--tasks", "webqa_task1"]
    assert tool.main([*argv, "--progress_every", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "test queries" in out and "24/24" in out and "wrote" in out
    assert tool.main([*argv[:3], str(tmp_path / "d"), *argv[4:], "--progress_every", "0"]) == 0
    out, _ = capsys.readouterr()
    assert "test queries" not in out and out.startswith("wrote")
