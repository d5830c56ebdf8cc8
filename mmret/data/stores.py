"""Stores: where examples come from, behind one protocol (:class:`Store`), in one module.

* :class:`RawStore`: an M-BEIR root on disk (JSON-lines records, image files read on demand).
* :class:`ArrayRecordStore`: a TFDS ArrayRecord build of such a root (:mod:`mmret.data.tfds_mbeir`
  writes it; records and image bytes read through the TFDS data sources, lookups memory-mapped).
* :class:`EvalStore`: what an evaluation embeds from an M-BEIR root: its test queries by task and the
  candidates of the pools evaluated (:mod:`mmret.eval.embed` writes them out).

The pipelines (:mod:`mmret.data.pipeline`) read a store only through :class:`Store`: its query records
(``queries``, indexed in order by training), each rendered into a source-neutral
:class:`~mmret.data.example.Example` by ``query_example``, candidates by id as
:class:`~mmret.data.example.Part` s, images by key, and an optional negatives file. The M-BEIR stores
get the rendering from :class:`~mmret.data.sources.mbeir.MBeirStore` (UniIR's text rule, the seeded
instruction draw) and keep their M-BEIR view besides (``queries`` as :class:`~mmret.data.mbeir.Query`,
``candidate(did)`` as :class:`~mmret.data.mbeir.Candidate`, ``pool``, ``instructions``); a store of
another source (a text-pair or caption file) implements the same protocol over its own records.

Each M-BEIR store subclasses :class:`~mmret.data.sources.mbeir.MBeirStore`, so it satisfies :class:`Store`
by itself; the layout rules they read (which files, which pools) stay in :mod:`mmret.data.mbeir`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, overload, runtime_checkable

import numpy as np
from etils import epath
from PIL import Image

from mmret.atomic_dir import PathLike, as_path, is_local
from mmret.data.bad_records import POSITIVE_NOT_IN_POOL, BadRecordError, BadRecords
from mmret.data.example import Example, Part
from mmret.data.images import MISSING, UNSAFE_PATH, BadImageError, load_image, load_image_bytes, unsafe_path_reason
from mmret.data.mbeir import (
    EVAL_TASKS,
    UNION_QUERY_FILES,
    Candidate,
    DatasetTask,
    Instructions,
    Query,
    dataset_task,
    global_pool_path,
    instructions_path,
    local_pool_path,
    parse_candidate,
    parse_query,
    pool_tasks,
    read_global_pool,
    read_instructions,
    read_local_pool,
    read_pool,
    read_queries,
    read_union_queries,
    union_file,
)
from mmret.data.negatives import read_negatives
from mmret.data.sources.mbeir import MBeirStore
from mmret.data.tfds_mbeir import CANDIDATES, QUERIES, BuildError, dataset_dir, path_key, read_manifest


@runtime_checkable
class Store(Protocol):
    """What the pipelines read from a store.

    ``queries``: the store's query records, in its order (training indexes them; their type is the
    store's own). ``query_example(record, seed=, epoch=)``: one of them as an :class:`Example`, the
    instruction (if the source has any) drawn from ``seed``, the record and ``epoch``; its candidates
    are ids of this store. ``candidate_part(cid)``: a candidate by id (``KeyError`` when absent).
    ``image(key, max_pixels=)``: the RGB image a part names (:class:`~mmret.data.images.BadImageError`
    when bad or absent). ``negatives``: a negatives file, query id -> ranked candidate ids, which then
    replaces every example's own negatives; ``None``: none given.
    """

    queries: Sequence[Any]
    negatives: Mapping[str, tuple[str, ...]] | None

    def query_example(self, record: Any, *, seed: int, epoch: int = 0) -> Example: ...

    def candidate_part(self, cid: str) -> Part: ...

    def image(self, key: str, *, max_pixels: int) -> Image.Image: ...


# ------------------------------------------------------------------------------------------- raw root


class RawStore(MBeirStore):
    """An M-BEIR root on disk: queries of one split, the candidates they need, images read on demand.

    Queries come from the split's union file when there is one (:func:`union_file`; up-sampled copies are
    separate examples) against the union pool, else from the per-task files; ``tasks`` keeps only those
    dataset-tasks either way.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        tasks: Sequence[str | DatasetTask] | None = None,
        *,
        negatives_file: PathLike | None = None,
        bad: BadRecords | None = None,
        query_file: str = "auto",
    ):
        self.root = as_path(root)
        self.bad = BadRecords("error") if bad is None else bad
        self.query_file = union_file(self.root, split, query_file)
        if self.query_file is not None:
            self.pool = read_pool(global_pool_path(self.root, split), bad=self.bad)
            self.queries = read_union_queries(self.query_file, tasks, bad=self.bad, pool=self.pool)
        else:
            self.pool = self._read_pool(split, tasks)
            self.queries = read_queries(self.root, split, tasks, bad=self.bad, pool=self.pool)
        path = instructions_path(self.root)
        self.instructions = read_instructions(path, bad=self.bad) if path.is_file() else None
        self.negatives = (
            read_negatives(negatives_file, pool=self.pool, bad=self.bad) if negatives_file is not None else None
        )

    def _read_pool(self, split: str, tasks: Sequence[str | DatasetTask] | None) -> dict[str, Candidate]:
        union = global_pool_path(self.root, split)
        if tasks is None and union.is_file():
            return read_pool(union, bad=self.bad)
        pool: dict[str, Candidate] = {}
        for task in EVAL_TASKS if tasks is None else tasks:
            for did, cand in read_local_pool(self.root, task, split, bad=self.bad).items():
                if pool.setdefault(did, cand) != cand:
                    raise ValueError(f"{self.root}: did {did!r} differs between local pools")
        return pool

    def candidate(self, did: str) -> Candidate:
        return self.pool[did]

    def image(self, path: str, *, max_pixels: int) -> Image.Image:
        return load_image(self.root, path, max_pixels=max_pixels)


# ------------------------------------------------------------------------------------- ArrayRecord build


class _Reader:
    """The data sources and lookup tables of one split of a build, opened lazily in each process."""

    def __init__(self, build: epath.Path, split: str, cache_size: int) -> None:
        self.build, self.split, self.cache_size = build, split, cache_size
        self._reset()

    def _where(self, name: str) -> str:
        return f"{dataset_dir(self.build, name)} {self.split}"

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._sources: dict[str, Any] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._where_prefix = {name: self._where(name) for name in (QUERIES, CANDIDATES)}

    def __getstate__(self) -> dict[str, Any]:
        return {"build": self.build, "split": self.split, "cache_size": self.cache_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # a forked child: reopen everything
            self._reset()

    def source(self, name: str) -> Any:
        """The TFDS data source of ``name`` for this split (``tfds.builder_from_directory(...).as_data_source``)."""
        self._check_pid()
        ds = self._sources.get(name)
        if ds is None:
            with self._lock:
                ds = self._sources.get(name)
                if ds is None:
                    import tensorflow_datasets as tfds

                    # A build on gs:// opens here, but its records only once array_record reads gs://
                    # (google/array_record#120: its reader opens local files).
                    builder = tfds.builder_from_directory(str(dataset_dir(self.build, name)))
                    ds = self._sources[name] = builder.as_data_source(split=self.split)
        return ds

    def array(self, name: str) -> np.ndarray:
        """``index/<split>/<name>.npy``, memory-mapped on a local disk (shared by every process through the
        page cache), else read into memory."""
        self._check_pid()
        arr = self._arrays.get(name)
        if arr is None:
            path = self.build / "index" / self.split / f"{name}.npy"
            if is_local(path):
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            else:  # memory-mapping needs a local file: read the table whole
                with path.open("rb") as f:
                    arr = np.load(f, allow_pickle=False)
            self._arrays[name] = arr
        return arr

    def record(self, name: str, row: int) -> dict[str, Any]:
        """Record ``row`` of ``name``: text fields as ``str``, ``image`` as ``bytes``; remembers its image."""
        raw = self.source(name)[row]
        rec = {k: (v if k == "image" else v.decode("utf-8")) for k, v in raw.items()}
        rec["image"] = bytes(rec["image"])
        rec["where"] = f"{self._where_prefix[name]}[{row}] (from {rec['source']})"
        return rec

    def remember(self, path: str | None, data: bytes) -> None:
        if path is None or self.cache_size <= 0:
            return
        with self._lock:
            self._cache[path] = data
            self._cache.move_to_end(path)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def cached(self, path: str) -> bytes | None:
        self._check_pid()
        with self._lock:
            return self._cache.get(path)

    def did_row(self, did: str) -> int | None:
        """The candidate row of ``did`` (binary search in ``did_sorted.npy``), ``None`` when absent."""
        try:
            key = did.encode("ascii")
        except (UnicodeEncodeError, AttributeError):
            return None
        ids = self.array("did_sorted")
        if not len(ids) or len(key) > ids.dtype.itemsize:
            return None
        i = int(np.searchsorted(ids, np.bytes_(key)))
        if i == len(ids) or ids[i] != key:
            return None
        return int(self.array("did_rows")[i])

    def image_row(self, path: str) -> int | None:
        """The row of a record holding image ``path`` (>= 0 candidate, < 0 query ``-1 - row``) or ``None``."""
        keys = self.array("image_keys")
        key = np.uint64(path_key(path))
        i = int(np.searchsorted(keys, key))
        if i == len(keys) or keys[i] != key:
            return None
        return int(self.array("image_rows")[i])


class _Queries(Sequence[Query]):
    """The queries at some record rows, decoded on access (with their copy numbers)."""

    def __init__(self, reader: _Reader, rows: np.ndarray, copies: np.ndarray | None, keep_src_content: bool) -> None:
        self._reader, self._keep = reader, keep_src_content
        self._rows, self._copies = rows, copies

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, index: int) -> int:
        """The record row of the ``index``-th query."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"query index {index} out of range ({n} queries)")
        return int(self._rows[index])

    @overload
    def __getitem__(self, index: int) -> Query: ...
    @overload
    def __getitem__(self, index: slice) -> list[Query]: ...
    def __getitem__(self, index: int | slice) -> Query | list[Query]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        rec = self._reader.record(QUERIES, self.row(index))
        query = parse_query(
            json.loads(rec["record"]), rec["where"], task=dataset_task(rec["task"]), keep_src_content=self._keep
        )
        if self._copies is not None and self._copies[self.row(index)]:
            query = dataclasses.replace(query, copy=int(self._copies[self.row(index)]))
        self._reader.remember(query.image_path, rec["image"])
        return query

    def __iter__(self) -> Iterator[Query]:
        for i in range(len(self)):
            yield self[i]


class _Pool(Mapping[str, Candidate]):
    """``did -> Candidate`` over the split's candidate records (membership needs no record read)."""

    def __init__(self, reader: _Reader, keep_src_content: bool) -> None:
        self._reader, self._keep = reader, keep_src_content

    def __getitem__(self, did: str) -> Candidate:
        row = self._reader.did_row(did)
        if row is None:
            raise KeyError(did)
        rec = self._reader.record(CANDIDATES, row)
        cand = parse_candidate(json.loads(rec["record"]), rec["where"], keep_src_content=self._keep)
        if cand.did != did:
            raise KeyError(f"{did!r}: the index of {self._reader.build} points at {cand.did!r} (corrupt build?)")
        self._reader.remember(cand.image_path, rec["image"])
        return cand

    def __contains__(self, did: object) -> bool:
        return isinstance(did, str) and self._reader.did_row(did) is not None

    def __len__(self) -> int:
        return len(self._reader.array("dids"))

    def __iter__(self) -> Iterator[str]:
        """The dids in pool order."""
        for did in self._reader.array("dids"):
            yield did.decode("ascii")


class ArrayRecordStore(MBeirStore):
    """A TFDS build (:func:`~mmret.data.tfds_mbeir.build_tfds_mbeir`) as a :class:`Store`.

    ``queries`` (a lazy sequence, the order RawStore gives for the same split and tasks), ``pool`` (a lazy
    ``did -> Candidate`` mapping), ``candidate(did)``, ``image(path, max_pixels=...)`` (the embedded bytes,
    decoded with :func:`~mmret.data.images.load_image_bytes`), ``instructions`` and ``negatives`` (from
    ``negatives_file``, e.g. the build's ``negatives/train.jsonl``). Records are read through the TFDS data
    sources on demand; only the few last images read are kept (``image_cache_size``), so that
    ``image()`` right after ``candidate()`` costs no second read. Picklable: grain workers reopen the
    files lazily. Unlike RawStore with ``tasks``, the pool is always the whole split's pool of the build.
    ``query_file`` (``data.query_file``): ``auto`` takes what the split was built from; another value must
    name it (a union file, or ``per_task``), else :class:`BuildError`.
    """

    def __init__(
        self,
        build: PathLike,
        split: str = "train",
        tasks: Sequence[str | DatasetTask] | None = None,
        *,
        negatives_file: PathLike | None = None,
        bad: BadRecords | None = None,
        keep_src_content: bool = False,
        image_cache_size: int = 64,
        query_file: str = "auto",
    ) -> None:
        self.build = as_path(build)
        self.split = split
        self.manifest = read_manifest(self.build)
        info = self.manifest["splits"].get(split)
        if info is None:
            raise BuildError(
                f"{self.build}: split {split!r} was not built (built: {', '.join(self.manifest['splits'])})"
            )
        built_file = info.get("query_file")
        if query_file not in ("auto", "per_task", *UNION_QUERY_FILES.get(split, {})):
            raise ValueError(f"data.query_file={query_file!r} has no meaning for split {split!r} of a build")
        if query_file != "auto":
            wanted = None if query_file == "per_task" else UNION_QUERY_FILES[split][query_file]
            if built_file != wanted:
                raise BuildError(
                    f"{self.build}: the {split} split was built from {built_file or 'the per-task files'}, "
                    f"not {wanted or 'the per-task files'} (data.query_file={query_file!r}); rebuild it"
                )
        self.query_file = built_file
        self.bad = BadRecords("error") if bad is None else bad
        self._reader = _Reader(self.build, split, image_cache_size)
        index = self.build / "index" / split
        if (index / "query_tasks.npy").is_file():
            built = list(info["task_names"])
            task_rows = np.asarray(self._reader.array("query_tasks"))
            copies = self._reader.array("query_copies")
        else:  # a build from before the per-row tables: contiguous task ranges
            built = list(info["task_ranges"])
            task_rows = np.concatenate(
                [np.full(b - a, i, np.int16) for i, (a, b) in enumerate(info["task_ranges"].values())] or [[]]
            )
            copies = None
        names = built if tasks is None else [dataset_task(t).name for t in tasks]
        missing = [n for n in names if n not in built]
        if missing:
            raise BuildError(f"{self.build}: task {missing[0]} is not in the {split} build (built: {', '.join(built)})")
        if built_file is None:  # per-task files: the tasks in the order asked, as RawStore reads them
            rows = np.concatenate([np.flatnonzero(task_rows == built.index(n)) for n in names] or [[]])
        else:  # a union file: its lines in file order
            rows = np.flatnonzero(np.isin(task_rows, [built.index(n) for n in names]))
        self.queries: Sequence[Query] = _Queries(self._reader, rows.astype(np.int64), copies, keep_src_content)
        self.pool: Mapping[str, Candidate] = _Pool(self._reader, keep_src_content)
        path = instructions_path(self.build)
        self.instructions: Instructions | None = read_instructions(path, bad=self.bad) if path.is_file() else None
        self.negatives: Mapping[str, tuple[str, ...]] | None = (
            read_negatives(negatives_file, pool=self.pool, bad=self.bad) if negatives_file is not None else None
        )

    def candidate(self, did: str) -> Candidate:
        """The candidate ``did`` (``KeyError`` when the split's pool has none)."""
        return self.pool[did]

    def image(self, path: str, *, max_pixels: int) -> Image.Image:
        """The RGB image embedded for ``path``; :class:`~mmret.data.images.BadImageError` when bad or absent."""
        data = self._reader.cached(path)
        if data is None:
            reason = unsafe_path_reason(path)
            if reason is not None:
                raise BadImageError(str(path), UNSAFE_PATH, reason)
            data = self._lookup_image(path)
        return load_image_bytes(data, max_pixels=max_pixels, name=path)

    def _lookup_image(self, path: str) -> bytes:
        row = self._reader.image_row(path)
        if row is not None:
            name, row = (CANDIDATES, row) if row >= 0 else (QUERIES, -1 - row)
            rec = self._reader.record(name, row)
            obj = json.loads(rec["record"])
            if obj.get("img_path" if name == CANDIDATES else "query_img_path") == path:
                self._reader.remember(path, rec["image"])
                return rec["image"]
        raise BadImageError(path, MISSING, f"no record of the {self.split} build {self.build} holds it")


# ----------------------------------------------------------------------------------------- evaluation


def sample_queries(queries: Sequence[Query], fraction: float, seed: int) -> list[Query]:
    """A seeded ``fraction`` of ``queries`` (``ceil(fraction * n)`` of them, in their order): those whose
    ``blake2b(seed, qid)`` is smallest, so a query's membership depends on the seed and its qid only (and
    a larger fraction keeps every query of a smaller one)."""
    if fraction >= 1.0:
        return list(queries)

    def key(q: Query) -> bytes:
        return hashlib.blake2b(f"{seed}\x00{q.qid}".encode(), digest_size=16).digest()

    keep = {id(q) for q in sorted(queries, key=key)[: math.ceil(fraction * len(queries))]}
    return [q for q in queries if id(q) in keep]


class EvalStore(MBeirStore):
    """The records an evaluation embeds: test queries by task, every candidate of the pools read (the
    tasks' local pools, :func:`~mmret.data.mbeir.pool_tasks`, and the union pool with ``"global"`` in
    ``pools``), images read on demand from inside the root.

    A query whose own-dataset positives (:func:`mmret.data.mbeir.restrict_positives`) are not all in its
    task's local pool is a ``positive_not_in_pool`` bad record (negatives are not checked: evaluation
    does not use them, and ``negatives`` is None). Query records go to one :class:`BadRecords` per task
    (``query_bad``, with the policy of ``bad``), the others to ``bad``. ``query_fraction`` < 1 keeps a seeded
    sample of each task's queries (:func:`sample_queries`)."""

    def __init__(
        self,
        root: PathLike,
        split: str,
        tasks: Sequence[str],
        pools: Sequence[str],
        bad: BadRecords,
        *,
        query_fraction: float = 1.0,
        query_seed: int = 0,
    ):
        self.root = as_path(root)
        self.negatives: Mapping[str, tuple[str, ...]] | None = None
        self.bad = bad
        path = instructions_path(self.root)
        self.instructions = read_instructions(path, bad=bad) if path.is_file() else None
        self.pools: dict[str, dict[str, Candidate]] = {
            task: read_local_pool(self.root, task, split, bad=bad) for task in pool_tasks(root, split, tasks, pools)
        }
        self.candidates: dict[str, Candidate] = {}
        for pool in self.pools.values():
            self.candidates.update(pool)
        self.members: list[str] = []  # the union pool's dids in file order (with "global")
        if "global" in pools:
            union = read_global_pool(self.root, split, bad=bad)
            self.members = list(union)
            for did, cand in union.items():
                self.candidates.setdefault(did, cand)
        self.query_bad = {t: BadRecords(bad.on_bad_record) for t in tasks}
        self.task_queries = {t: sample_queries(self._read_queries(split, t), query_fraction, query_seed) for t in tasks}
        self.queries: list[Query] = [q for qs in self.task_queries.values() for q in qs]

    def _read_queries(self, split: str, task: str) -> list[Query]:
        bad, pool = self.query_bad[task], self.pools[task]
        out = []
        for q in read_queries(self.root, split, task, bad=bad, eval_positives=True):
            missing = [d for d in q.pos_cand_list if d not in pool]  # own-dataset positives (eval_positives)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                where = local_pool_path(self.root, task, split)
                detail = f"query {q.qid}: positive {missing[0]!r} is not in the local pool {where}{more}"
                bad.handle(BadRecordError(q.where or q.qid, POSITIVE_NOT_IN_POOL, detail))
                continue
            out.append(q)
        return out

    def skipped(self) -> dict[str, Any]:
        """The records skipped (``on_bad_record="skip"``): per task the test queries dropped, and the
        other records (pool candidates, instruction rows); ``{}`` when none."""
        out: dict[str, Any] = {}
        queries = {t: _bad_summary(b) for t, b in self.query_bad.items() if b.total}
        if queries:
            out["queries"] = queries
        if self.bad.total:
            out["other_records"] = _bad_summary(self.bad)
        return out

    def candidate(self, did: str) -> Candidate:
        """The candidate ``did`` of any pool read (``KeyError`` when none holds it)."""
        return self.candidates[did]

    def image(self, path: str, *, max_pixels: int) -> Image.Image:
        """The RGB image at ``path`` under the root; :class:`~mmret.data.images.BadImageError` when bad."""
        return load_image(self.root, path, max_pixels=max_pixels)


def _bad_summary(bad: BadRecords) -> dict[str, Any]:
    """``{"count", "reasons", "examples"}`` of the records ``bad`` skipped (an embeddings manifest's ``skipped``)."""
    return {"count": bad.total, "reasons": dict(sorted(bad.counts.items())), "examples": sum(bad.examples.values(), [])}
