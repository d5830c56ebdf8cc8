"""An M-BEIR root converted into TFDS ArrayRecord datasets (image bytes embedded): the build and its format.

Pods then read a few large sharded files instead of millions of small images. TensorFlow is never
needed: records are ``tf.train.Example`` protos written with TFDS's own (TF-free) serializer, whose
features are plain text and bytes, and TFDS decodes them through numpy. Layout of a build::

    mmret_build.json                      manifest: source, splits, counts, task ranges, skip report
    mbeir_queries/1.0.0/                  TFDS dataset, splits train / val / test (those built)
        dataset_info.json  features.json
        mbeir_queries-<split>.array_record-XXXXX-of-YYYYY
    mbeir_candidates/1.0.0/               the pool of each split (as RawStore reads it), same layout
    index/<split>/                        numpy lookup tables (no pickles), memory-mapped by readers
        dids.npy                          candidate ids in record order (fixed-width bytes)
        did_sorted.npy  did_rows.npy      sorted ids and their record rows (did -> row)
        image_keys.npy  image_rows.npy    sorted 64-bit path hashes -> row (>= 0 candidate, < 0 query)
    instructions/query_instructions.tsv   copied byte for byte (when the root has it)
    negatives/train.jsonl                 the validated negatives file (when one was given)

A record has the features ``id`` (qid / did), ``record`` (the source JSON object, re-serialised),
``source`` (``<relative file>:<line>`` in the root), ``image`` (the image file's bytes, empty without
an image) and, for queries, ``task`` (``<dataset>_task<N>``). Read one without TF::

    import tensorflow_datasets as tfds
    ds = tfds.data_source("mbeir_queries", data_dir=BUILD, split="train")
    # or: tfds.builder_from_directory(f"{BUILD}/mbeir_queries/1.0.0").as_data_source(split="train")
    ds[0]  # {'id': b'0:1', 'image': b'', 'record': b'{"qid": ...}', 'source': b'query/train/...:1', 'task': ...}

The build validates every record with the reader (:func:`~mmret.data.mbeir.parse_query`,
:func:`~mmret.data.mbeir.parse_candidate`, duplicate ids, positives in the pool) and decodes every image
once under the pixel cap; a bad record, including a missing, corrupt, escaping or over-cap image,
stops the build (``on_bad_record="error"``, naming ``file:line``) or is skipped and counted
(``"skip"``; a query whose positive was skipped is then skipped too). Records keep the reader's order,
so :class:`~mmret.data.stores.ArrayRecordStore` (the store reading a build) and
:class:`~mmret.data.stores.RawStore` index the same queries alike.

The root and the build may be on any file system :mod:`etils.epath` reads (``gs://``, ...). ArrayRecord
opens local files only (google/array_record#120), so off a local disk each shard is written to a local
staging file and uploaded as it closes; reading such a build back needs an array_record that reads it.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from etils import epath

from mmret.atomic_dir import PathLike, absolute, as_path, atomic_output_dir, is_local
from mmret.data.bad_records import BAD_ID, BAD_IMAGE, DUPLICATE_ID, BadRecordError, BadRecords, OnBadRecord
from mmret.data.images import (
    DEFAULT_MAX_PIXELS,
    UNREADABLE,
    BadImageError,
    load_image_bytes,
    resolve_image_path,
)
from mmret.data.mbeir import (
    EVAL_TASKS,
    SPLITS,
    DatasetTask,
    Query,
    check_against_pool,
    dataset_task,
    global_pool_path,
    instructions_path,
    iter_jsonl,
    local_pool_path,
    parse_candidate,
    parse_query,
    query_path,
    query_task,
    read_instructions,
    union_file,
)
from mmret.data.negatives import read_negatives, write_negatives
from mmret.progress import progress

FORMAT = "mmret.tfds_mbeir"
FORMAT_VERSION = 1
MANIFEST = "mmret_build.json"
QUERIES = "mbeir_queries"
CANDIDATES = "mbeir_candidates"
TFDS_VERSION = "1.0.0"
#: What TFDS itself writes (one record per chunk: cheap random access).
ARRAY_RECORD_OPTIONS = "group_size:1"
#: Shard size when no shard count is asked for.
DEFAULT_SHARD_BYTES = 1 << 30
#: Records per image-check batch handed to the worker processes.
_CHUNK = 512


class BuildError(Exception):
    """A problem with the input as a whole (a missing file, an empty split), not with one record."""


# ---------------------------------------------------------------------------------------------- helpers


def dataset_dir(build: PathLike, name: str) -> epath.Path:
    """The TFDS builder directory of ``name`` (:data:`QUERIES` or :data:`CANDIDATES`) in a build."""
    return as_path(build) / name / TFDS_VERSION


def path_key(path: str) -> int:
    """The 64-bit key of an image path in ``image_keys.npy`` (blake2b, little-endian)."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest(), "little")


def _features(name: str) -> Any:
    import tensorflow_datasets as tfds

    spec: dict[str, Any] = {
        "id": tfds.features.Text(),
        "record": tfds.features.Text(),
        "source": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
    }
    if name == QUERIES:
        spec["task"] = tfds.features.Text()
    return tfds.features.FeaturesDict(spec)


def read_manifest(build: PathLike) -> dict[str, Any]:
    """The build's manifest; :class:`BuildError` when ``build`` is not an mmret TFDS build."""
    path = as_path(build) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(f"{build}: not an M-BEIR TFDS build (no {MANIFEST}; see tools/build_tfds_mbeir.py)") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BuildError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    return manifest


# ----------------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """One split of one TFDS dataset: contiguous ArrayRecord shards, named ``-XXXXX-of-YYYYY`` on close."""

    def __init__(
        self, directory: epath.Path, name: str, split: str, *, per_shard: int | None, shard_bytes: int
    ) -> None:
        self.directory, self.name, self.split = directory, name, split
        self.per_shard, self.shard_bytes = per_shard, shard_bytes
        self.shard_lengths: list[int] = []
        self.num_bytes = self.num_records = 0
        self._writer: Any = None
        self._count = self._bytes = 0
        # ArrayRecord's writer opens local files only: off a local disk each shard is written to a
        # local staging file, then uploaded under its partial name when it closes.
        self._staging = None if is_local(directory) else tempfile.TemporaryDirectory(prefix="mmret-array-record-")

    def _partial(self, index: int) -> epath.Path:
        return self.directory / f".{self.name}-{self.split}.array_record-{index:05d}.partial"

    def _open_file(self) -> str:
        """Where the open shard is written: its partial file, or the local staging file."""
        if self._staging is None:
            return str(self._partial(len(self.shard_lengths)))
        return os.path.join(self._staging.name, "shard.array_record")

    def write(self, data: bytes) -> None:
        if self._writer is None:
            from array_record.python.array_record_module import ArrayRecordWriter

            self._writer = ArrayRecordWriter(self._open_file(), ARRAY_RECORD_OPTIONS)
        self._writer.write(data)
        self._count += 1
        self.num_records += 1
        self._bytes += len(data)
        self.num_bytes += len(data)
        full = self._count >= self.per_shard if self.per_shard else self._bytes >= self.shard_bytes
        if full:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if self._staging is not None:
                staged = self._open_file()
                as_path(staged).copy(self._partial(len(self.shard_lengths)), overwrite=True)
                os.remove(staged)
            self.shard_lengths.append(self._count)
            self._count = self._bytes = 0

    def close(self) -> Any:
        """Close the last shard, rename them all, return the TFDS ``SplitInfo``."""
        import tensorflow_datasets as tfds

        self._close_shard()
        if self._staging is not None:
            self._staging.cleanup()
        n = len(self.shard_lengths)
        for i in range(n):  # on an object store each rename is a copy
            self._partial(i).rename(self.directory / f"{self.name}-{self.split}.array_record-{i:05d}-of-{n:05d}")
        return tfds.core.SplitInfo(name=self.split, shard_lengths=list(self.shard_lengths), num_bytes=self.num_bytes)


def _read_image_job(args: tuple[str, str, int, bool]) -> tuple[bytes | None, BadImageError | None]:
    """Read (and with ``verify``, decode under the cap) one image: ``(bytes, None)`` or ``(None, error)``."""
    root, rel_path, max_pixels, verify = args
    try:
        path = resolve_image_path(root, rel_path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BadImageError(rel_path, UNREADABLE, f"{type(e).__name__}: {e}") from e
        if verify:
            load_image_bytes(data, max_pixels=max_pixels, name=rel_path)
        return data, None
    except BadImageError as e:
        return None, e


class _ImageReader:
    """Reads the images of records in order, checking each distinct path once (optionally in processes)."""

    def __init__(self, root: epath.Path, max_pixels: int, num_workers: int) -> None:
        self.root, self.max_pixels = str(root), max_pixels
        self.good: set[int] = set()  # path keys already decoded fine
        self.bad: dict[str, BadImageError] = {}
        self.num_checked = 0
        self.num_workers = num_workers
        self._pool = multiprocessing.get_context("spawn").Pool(num_workers) if num_workers > 0 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def read(self, paths: Sequence[str | None]) -> list[bytes | BadImageError]:
        """The bytes (``b""`` for ``None``) or the error of each path."""
        out: list[bytes | BadImageError | None] = [None] * len(paths)
        jobs, slots = [], []
        verifying: set[str] = set()  # decode a path once even when several records of the batch use it
        for i, p in enumerate(paths):
            if p is None:
                out[i] = b""
            elif p in self.bad:
                out[i] = self.bad[p]
            else:
                verify = p not in verifying and path_key(p) not in self.good
                if verify:
                    verifying.add(p)
                jobs.append((self.root, p, self.max_pixels, verify))
                slots.append(i)
        if self._pool is not None and len(jobs) > 1:
            results = self._pool.map(_read_image_job, jobs, chunksize=max(1, len(jobs) // (4 * self.num_workers)))
        else:
            results = [_read_image_job(j) for j in jobs]
        for i, job, (data, err) in zip(slots, jobs, results, strict=True):
            if err is None and job[1] in self.bad:  # a record of this batch found it bad
                err = self.bad[job[1]]
            if err is not None:
                self.bad[job[1]] = err
                out[i] = err
            else:
                if job[3]:
                    self.num_checked += 1
                    self.good.add(path_key(job[1]))
                out[i] = data
        return out  # type: ignore[return-value]


@dataclasses.dataclass
class _Pending:
    """A validated record waiting for its image: fields of the TFDS example and its id / image path."""

    where: str
    rid: str
    image_path: str | None
    example: dict[str, Any]
    copy: int = 0  # the n-th line of this qid in a union file


class _SplitBuilder:
    """Writes the candidates, then the queries, of one split; collects the lookup tables."""

    def __init__(self, b: _Build, split: str) -> None:
        self.b, self.split = b, split
        self.dids: list[str] = []
        self.did_set: set[str] = set()
        self.image_keys = array.array("Q")  # compact: a real pool has millions of images
        self.image_rows = array.array("q")
        self.task_ranges: dict[str, list[int]] = {}  # per-task files only: each task's contiguous rows
        self.query_tasks = array.array("h")  # per query row: its task's index in self.task_names
        self.query_copies = array.array("i")  # per query row: its copy number (union files)
        self.task_names: list[str] = []
        self.pool_files: list[str] = []
        self.union = union_file(b.root, split, b.query_file)  # None: the per-task files

    def _rel(self, where: str) -> str:
        file, _, line = where.rpartition(":")
        root = self.b.root
        rel = os.path.relpath(file, root) if is_local(root) else str(as_path(file).relative_to(root))
        return f"{rel}:{line}"

    def _flush(
        self, pending: list[_Pending], writer: _ShardWriter, serializer: Any, features: Any, on_written: Callable
    ) -> None:
        images = self.b.images.read([p.image_path for p in pending])
        for p, image in zip(pending, images, strict=True):
            if isinstance(image, BadImageError):
                self.b.bad.handle(BadRecordError(p.where, BAD_IMAGE, str(image)))
                continue
            p.example["image"] = image
            on_written(p)
            writer.write(serializer.serialize_example(features.encode_example(p.example)))
        pending.clear()

    def _write(self, name: str, records: Iterator[_Pending], upper_bound: int, on_written: Callable) -> Any:
        from tensorflow_datasets.core import example_serializer

        features = self.b.features[name]
        serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        per_shard = math.ceil(upper_bound / self.b.num_shards) if self.b.num_shards else None
        writer = _ShardWriter(
            dataset_dir(self.b.tmp, name), name, self.split, per_shard=per_shard, shard_bytes=self.b.shard_bytes
        )
        bar = self.b.progress(f"{self.split} {name.removeprefix('mbeir_')}", upper_bound)
        pending: list[_Pending] = []
        seen = 0
        for rec in records:
            pending.append(rec)
            if len(pending) >= _CHUNK:
                seen += len(pending)
                self._flush(pending, writer, serializer, features, on_written)
                bar.set_postfix_str(f"{writer.num_records} written", refresh=False)
                bar.update(seen - bar.n)
        seen += len(pending)
        self._flush(pending, writer, serializer, features, on_written)
        bar.total = seen  # the valid records read (the bound counted lines)
        bar.set_postfix_str(f"{writer.num_records} written", refresh=False)
        bar.update(seen - bar.n)
        bar.close()
        info = writer.close()
        if not info.shard_lengths:
            raise BuildError(f"{self.b.root}: no valid {name.removeprefix('mbeir_')} in split {self.split!r}")
        return info

    # -- candidates

    def _pool_sources(self) -> list[epath.Path]:
        union = global_pool_path(self.b.root, self.split)
        if self.union is not None:  # a union query file reads the union pool, as RawStore
            if not union.is_file():
                raise BuildError(f"{union}: no {self.split} pool for the union query file {self.union.name}")
            return [union]
        if self.b.tasks is None and union.is_file():
            return [union]
        paths = [local_pool_path(self.b.root, t, self.split) for t in (self.b.tasks or EVAL_TASKS)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise BuildError(f"{missing[0]}: no {self.split} pool ({union.name} is not there either)")
        return list(dict.fromkeys(paths))

    def _candidates(self, sources: list[epath.Path]) -> Iterator[_Pending]:
        union = len(sources) > 1
        fingerprints: dict[str, tuple[Any, ...]] = {}
        yielded: set[str] = set()
        for path in sources:
            seen: set[str] = set()
            for where, obj in iter_jsonl(path, self.b.bad):
                try:
                    cand = parse_candidate(obj, where, keep_src_content=False)
                    if cand.did in seen:
                        raise BadRecordError(where, DUPLICATE_ID, f"did {cand.did!r} appears twice")
                    seen.add(cand.did)
                except BadRecordError as e:
                    self.b.bad.handle(e)
                    continue
                if union:  # the same candidate may sit in several local pools (RawStore's merge)
                    fp = (cand.text, cand.image_path, cand.modality)
                    if fingerprints.setdefault(cand.did, fp) != fp:
                        raise BuildError(f"{where}: did {cand.did!r} differs between local pools")
                    if cand.did in yielded:
                        continue
                    yielded.add(cand.did)
                example = {"id": cand.did, "record": json.dumps(obj), "source": self._rel(where)}
                yield _Pending(where, cand.did, cand.image_path, example)

    def _add_candidate(self, p: _Pending) -> None:
        row = len(self.dids)
        self.dids.append(p.rid)
        self.did_set.add(p.rid)
        if p.image_path is not None:
            self.image_keys.append(path_key(p.image_path))
            self.image_rows.append(row)

    # -- queries

    def _queries(self) -> Iterator[_Pending]:
        if self.union is not None:
            yield from self._union_queries()
            return
        seen: set[str] = set()
        pool = _KeySet(self.did_set)
        for task in self.b.tasks or EVAL_TASKS:
            path = query_path(self.b.root, self.split, task)
            for where, obj in iter_jsonl(path, self.b.bad):
                try:
                    query = parse_query(obj, where, task=task, keep_src_content=False)
                    if query.qid in seen:
                        raise BadRecordError(where, DUPLICATE_ID, f"qid {query.qid!r} appears twice")
                    check_against_pool(query, pool, where)
                except BadRecordError as e:
                    self.b.bad.handle(e)
                    continue
                seen.add(query.qid)  # as the reader: before the image check
                example = {"id": query.qid, "task": task.name, "record": json.dumps(obj), "source": self._rel(where)}
                yield _Pending(where, query.qid, query.image_path, example)

    def _union_queries(self) -> Iterator[_Pending]:
        """The union file's lines in file order, each an example (as :func:`~mmret.data.mbeir.read_union_queries`:
        a repeated qid must repeat its record and is numbered by its copy)."""
        pool = _KeySet(self.did_set)
        keep = None if self.b.tasks is None else set(self.b.tasks)
        first: dict[str, tuple[Query, int]] = {}  # qid -> (first record, copies so far)
        for where, obj in iter_jsonl(self.union, self.b.bad):
            try:
                query = parse_query(obj, where, keep_src_content=False)
                if query.qid in first:
                    record, copy = first[query.qid]
                    if record != query:
                        raise BadRecordError(where, DUPLICATE_ID, f"qid {query.qid!r} repeats with another record")
                    copy += 1
                else:
                    check_against_pool(query, pool, where)
                    copy = 0
                task = query_task(query)
                if task is None:
                    raise BadRecordError(where, BAD_ID, f"qid {query.qid!r}: unknown dataset id {query.dataset_id}")
            except BadRecordError as e:
                self.b.bad.handle(e)
                continue
            first[query.qid] = (first.get(query.qid, (query, 0))[0], copy)
            if keep is not None and task not in keep:
                continue
            example = {"id": query.qid, "task": task.name, "record": json.dumps(obj), "source": self._rel(where)}
            yield _Pending(where, query.qid, query.image_path, example, copy)

    def _add_query(self, p: _Pending) -> None:
        row = self._num_queries
        self._num_queries += 1
        task = p.example["task"]
        if task not in self.task_names:
            self.task_names.append(task)
        self.query_tasks.append(self.task_names.index(task))
        self.query_copies.append(p.copy)
        if self.union is None:
            self.task_ranges.setdefault(task, [row, row])[1] = row + 1  # tasks come in order
        if p.image_path is not None:
            self.image_keys.append(path_key(p.image_path))
            self.image_rows.append(-1 - row)

    # -- all

    def run(self) -> tuple[Any, Any]:
        self._num_queries = 0
        tasks = self.b.tasks or EVAL_TASKS
        query_files = (
            [self.union] if self.union is not None else [query_path(self.b.root, self.split, t) for t in tasks]
        )
        if self.union is None:
            for task, path in zip(tasks, query_files, strict=True):
                if not path.is_file():
                    raise BuildError(f"{path}: no {self.split} queries for {task.name} (choose the tasks to build)")
        sources = self._pool_sources()
        self.pool_files = [str(p.relative_to(self.b.root)) for p in sources]
        cand_info = self._write(CANDIDATES, self._candidates(sources), _count_lines(sources), self._add_candidate)
        query_info = self._write(QUERIES, self._queries(), _count_lines(query_files), self._add_query)
        n = self._num_queries
        if self.union is None:
            self.task_ranges = {t.name: self.task_ranges.get(t.name, [n, n]) for t in tasks}
        self._write_index()
        return query_info, cand_info

    def _write_index(self) -> None:
        d = as_path(self.b.tmp) / "index" / self.split
        d.mkdir(parents=True)
        dids = np.array(self.dids, dtype=np.bytes_)
        order = np.argsort(dids, kind="stable")
        _save(d / "dids.npy", dids)
        _save(d / "did_sorted.npy", dids[order])
        _save(d / "did_rows.npy", order.astype(np.int64))
        _save(d / "query_tasks.npy", np.frombuffer(self.query_tasks, dtype=np.int16))
        _save(d / "query_copies.npy", np.frombuffer(self.query_copies, dtype=np.int32))
        keys = np.frombuffer(self.image_keys, dtype=np.uint64)
        rows = np.frombuffer(self.image_rows, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        keys, rows = keys[order], rows[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]  # a path used by several records: keep its first record
        _save(d / "image_keys.npy", keys[first])
        _save(d / "image_rows.npy", rows[first])


def _save(path: epath.Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` on any file system."""
    with path.open("wb") as f:
        np.save(f, array)


def _count_lines(paths: Iterable[epath.Path]) -> int:
    """An upper bound on the records of some JSON-lines files (their newline count), for shard sizes."""
    n = 0
    for path in paths:
        if not path.is_file():
            continue
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                n += chunk.count(b"\n")
            n += 1
    return max(n, 1)


class _KeySet(Mapping[str, None]):
    """A set seen as a mapping (what :func:`~mmret.data.mbeir.check_against_pool` looks ids up in)."""

    def __init__(self, keys: set[str]) -> None:
        self._keys = keys

    def __getitem__(self, key: str) -> None:
        if key not in self._keys:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclasses.dataclass
class BuildReport:
    """What a build wrote: per split ``{"queries": n, "candidates": m}``, the skip report, sizes, timing."""

    out: epath.Path
    counts: dict[str, dict[str, int]]
    bad: BadRecords
    num_bytes: int
    images_checked: int
    seconds: float

    def lines(self) -> list[str]:
        """A short human-readable summary (counts, size, speed, then the bad-record report)."""
        n = sum(sum(c.values()) for c in self.counts.values())
        out = [
            f"wrote {self.out}: {n} records ({self.num_bytes / 1e6:.1f} MB, {self.images_checked} distinct images "
            f"checked) in {self.seconds:.1f}s ({n / max(self.seconds, 1e-9):.0f} records/s)"
        ]
        out += [f"  {s}: {c['queries']} queries, {c['candidates']} candidates" for s, c in self.counts.items()]
        return out + self.bad.report()


@dataclasses.dataclass
class _Build:
    root: epath.Path
    tmp: Path | epath.Path  # a pathlib.Path on a local disk (mmret.atomic_dir)
    tasks: tuple[DatasetTask, ...] | None
    bad: BadRecords
    images: _ImageReader
    num_shards: int | None
    shard_bytes: int
    progress_every: float | None
    log: Callable[[str], None] | None
    features: dict[str, Any]
    query_file: str = "auto"
    progress_out: TextIO | None = None

    @property
    def shows_progress(self) -> bool:
        return self.progress_every != 0 and (self.progress_out is not None or self.log is not None)

    def progress(self, desc: str, total: int) -> Any:
        """A :func:`mmret.progress.progress` bar of records (disabled when the build shows no progress)."""
        out = self.progress_out if self.progress_out is not None else _LogStream(self.log)
        return progress(total, desc, unit="record", every=self.progress_every, out=out, disable=not self.shows_progress)


class _LogStream:
    """A text stream whose lines go to a ``log`` callable (none: dropped)."""

    def __init__(self, log: Callable[[str], None] | None) -> None:
        self.log = log

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip() and self.log is not None:
                self.log(line)

    def flush(self) -> None:
        pass


def build_tfds_mbeir(
    mbeir_root: PathLike,
    out: PathLike,
    *,
    splits: Sequence[str] = SPLITS,
    tasks: Sequence[str | DatasetTask] | None = None,
    num_shards: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_bad_record: OnBadRecord = "error",
    bad: BadRecords | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    negatives_file: PathLike | None = None,
    num_workers: int = 0,
    progress_every: float | None = None,
    log: Callable[[str], None] | None = None,
    progress_out: TextIO | None = None,
    force: bool = False,
    query_file: str = "auto",
) -> BuildReport:
    """Convert the M-BEIR root ``mbeir_root`` into a TFDS build at ``out`` (written beside it, renamed at the end).

    Per split: the queries RawStore would read, with ``query_file`` as its ``data.query_file`` (default
    ``auto``: train / val from their union file when the root has one, each line an example; else the
    per-task files of ``tasks``, default the 16 evaluated dataset-tasks, in that order; ``tasks`` filters a
    union file too), and the pool RawStore would read (the global ``mbeir_union_<split>`` pool with a union
    file, or when ``tasks`` is None and it exists, else the union of the tasks' local pools).
    ``num_shards``: at most that many contiguous shards per split and dataset (default: one per
    ``shard_bytes``). ``max_pixels``: the decode cap every image is
    checked against. ``negatives_file``: a negatives file (:mod:`mmret.data.negatives`) for the train
    queries, validated against the train pool and copied. ``num_workers`` > 0 reads and checks images in
    that many processes (spawned: call it under ``if __name__ == "__main__":``). Progress: one
    :mod:`mmret.progress` bar per split and dataset (records read of the file's line count), written to
    ``progress_out`` (a live bar on a terminal, else whole lines) or, without it, as lines to ``log``
    (which also gets a ``split <name>:`` line per split); ``progress_every``: seconds between redraws
    (default: :mod:`mmret.progress`'s, live on a terminal and every 10 s elsewhere; 0: no progress shown;
    without ``log`` and ``progress_out`` none is). ``bad`` (a :class:`BadRecords`) replaces ``on_bad_record`` and
    collects the skips. Raises :class:`BadRecordError` (under ``"error"``) or :class:`BuildError`.
    """
    root = as_path(mbeir_root)
    if not root.is_dir():
        raise BuildError(f"{root}: M-BEIR root is not a directory")
    splits = list(dict.fromkeys(splits))
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r} (choose from {', '.join(SPLITS)})")
    if not splits:
        raise ValueError("no split to build")
    if num_shards is not None and num_shards <= 0:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    if negatives_file is not None and "train" not in splits:
        raise ValueError("a negatives file needs the train split")
    task_list = None if tasks is None else tuple(dict.fromkeys(dataset_task(t) for t in tasks))
    bad = BadRecords(on_bad_record) if bad is None else bad
    start = time.perf_counter()
    images = _ImageReader(root, max_pixels, num_workers)
    try:
        with atomic_output_dir(out, force=force) as tmp:
            for name in (QUERIES, CANDIDATES):
                dataset_dir(tmp, name).mkdir(parents=True)
            b = _Build(
                root, tmp, task_list, bad, images, num_shards, shard_bytes, progress_every, log,
                {name: _features(name) for name in (QUERIES, CANDIDATES)}, query_file, progress_out,
            )  # fmt: skip
            infos: dict[str, list[Any]] = {QUERIES: [], CANDIDATES: []}
            manifest_splits: dict[str, Any] = {}
            counts: dict[str, dict[str, int]] = {}
            for split in splits:
                if log is not None and b.shows_progress:
                    log(f"split {split}:")
                sb = _SplitBuilder(b, split)
                qinfo, cinfo = sb.run()
                infos[QUERIES].append(qinfo)
                infos[CANDIDATES].append(cinfo)
                counts[split] = {"queries": qinfo.num_examples, "candidates": cinfo.num_examples}
                manifest_splits[split] = {
                    **counts[split],
                    "pool_files": sb.pool_files,
                    "query_file": None if sb.union is None else str(sb.union.relative_to(root)),
                    "task_names": sb.task_names,  # the values of index/<split>/query_tasks.npy
                    "task_ranges": sb.task_ranges if sb.union is None else None,
                }
                if split == "train" and negatives_file is not None:
                    negs = read_negatives(negatives_file, pool=_KeySet(sb.did_set), bad=bad)
                    (tmp / "negatives").mkdir()
                    write_negatives(tmp / "negatives" / "train.jsonl", negs.items())
            instructions = instructions_path(root)
            if instructions.is_file():
                read_instructions(instructions, bad=bad)  # validate
                (tmp / "instructions").mkdir()
                instructions.copy(as_path(tmp) / "instructions" / instructions.name)
            _write_tfds_metadata(tmp, infos, b.features)
            num_bytes = sum(i.num_bytes for v in infos.values() for i in v)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "source_root": absolute(root),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "tasks": None if task_list is None else [t.name for t in task_list],
                "max_pixels": max_pixels,
                "splits": manifest_splits,
                "negatives": {"train": "negatives/train.jsonl"} if negatives_file is not None else {},
                "instructions": instructions.is_file(),
                "num_bytes": num_bytes,
                "bad_records": {
                    "on_bad_record": bad.on_bad_record,
                    "skipped": dict(bad.counts),
                    "examples": bad.examples,
                },
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    finally:
        images.close()
    return BuildReport(as_path(out), counts, bad, num_bytes, images.num_checked, time.perf_counter() - start)


def _write_tfds_metadata(tmp: PathLike, infos: Mapping[str, list[Any]], features: Mapping[str, Any]) -> None:
    import tensorflow_datasets as tfds

    for name, split_infos in infos.items():
        tfds.folder_dataset.write_metadata(
            data_dir=dataset_dir(tmp, name),
            features=features[name],
            split_infos=split_infos,
            version=TFDS_VERSION,
            check_data=False,  # reading it back through as_dataset would need TensorFlow
            description=f"M-BEIR {name.removeprefix('mbeir_')} with embedded image bytes (mmret).",
        )
