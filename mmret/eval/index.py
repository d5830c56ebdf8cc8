"""Nearest-neighbour search over L2-normalised embeddings by inner product, for offline M-BEIR evaluation.

Two kinds of index, one interface (``search(queries, k) -> (ids, scores)``, ``save(dir)``, ``load(dir)``):

* :class:`ExactIndex`: chunked matrix products with a running top-k (:func:`exact_search`); exact, with
  ties broken by the lower candidate index, so results are deterministic.
* :class:`ScannIndex`: ScaNN (k-means tree partitioning, anisotropic asymmetric hashing, exact float32
  reordering of the best candidates). Scores are the reordered exact inner products.

:func:`build_index` picks one from a :class:`SearchConfig` (``method="auto"``: exact for small pools,
ScaNN above ``brute_force_below``); :func:`check_exact` measures an index's recall against exact search on
a sample of queries. Inputs may be float16 or float32; the arithmetic is float32. Missing neighbours (a
ScaNN search that found fewer than k) come back as id -1 with score -inf.

    index = build_index(candidate_embeddings, SearchConfig(), k=50)
    ids, scores = index.search(query_embeddings, 50)
    index.save("out/index"); index = load_index("out/index")
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
from etils import epath

from mmret.atomic_dir import PathLike, as_path, atomic_output_dir, is_local
from mmret.recipe import SearchConfig

log = logging.getLogger("mmret.eval")

INDEX_FORMAT = 1
_DEFAULT = SearchConfig()
# Score-matrix budget of exact search: query rows per block = this // chunk (128 MiB of float32 scores).
_EXACT_SCORE_ELEMENTS = 1 << 25
# Queries per ScaNN call (ScaNN parallelises inside a call; this only bounds the result arrays).
_SCANN_QUERY_BATCH = 16384


def _scann():
    """ScaNN, imported on first use (only ScaNN indexes need it)."""
    import scann

    return scann


# --- exact search ---------------------------------------------------------------------------------------------


def _check_pair(queries: np.ndarray, vectors: np.ndarray) -> None:
    if queries.ndim != 2 or vectors.ndim != 2:
        raise ValueError(f"queries and vectors must be 2-D, got shapes {queries.shape} and {vectors.shape}")
    if queries.shape[1] != vectors.shape[1]:
        raise ValueError(f"dimension mismatch: queries {queries.shape[1]}, vectors {vectors.shape[1]}")
    if vectors.shape[0] == 0:
        raise ValueError("cannot search an empty pool")


def _merge_chunk(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the scores ``s`` [B, C] of candidates ``offset..offset+C-1`` into the running top-k (rows sorted
    by descending score, then ascending id; padding -inf / -1). All running ids are below ``offset``, so a
    chunk candidate enters only with a score strictly above the running k-th, and a stable sort keeps ties
    in id order."""
    rows_n, cols_n = s.shape
    k = best_s.shape[1]
    mask = s > best_s[:, -1:]
    if cols_n > k and int(mask.sum(axis=1).max()) > k:
        kth = np.partition(s, cols_n - k, axis=1)[:, cols_n - k]  # the k-th largest of each row
        mask &= s >= kth[:, None]
    rows, cols = np.nonzero(mask)  # row-major: ascending candidate index within a row
    if rows.size == 0:
        return best_s, best_i
    counts = np.bincount(rows, minlength=rows_n)
    starts = np.cumsum(counts) - counts
    pos = k + np.arange(rows.size) - starts[rows]
    width = k + int(counts.max())
    cand_s = np.full((rows_n, width), -np.inf, np.float32)
    cand_i = np.full((rows_n, width), -1, np.int64)
    cand_s[:, :k], cand_i[:, :k] = best_s, best_i
    cand_s[rows, pos] = s[rows, cols]
    cand_i[rows, pos] = cols + offset
    order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)


def exact_search(
    queries: np.ndarray, vectors: np.ndarray, k: int, *, chunk: int = SearchConfig.exact_chunk
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product: ``(ids int64 [Q, k], scores float32 [Q, k])``, each row sorted by
    descending score with ties broken by the lower candidate index. ``k`` above the pool size is cut to it.
    Candidates are scored ``chunk`` at a time (converted to float32 per chunk, so a float16 pool is never
    copied whole) and queries in blocks, so memory stays bounded."""
    _check_pair(queries, vectors)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n = vectors.shape[0]
    k = min(k, n)
    q_all = np.asarray(queries, dtype=np.float32)
    ids = np.empty((q_all.shape[0], k), np.int64)
    scores = np.empty((q_all.shape[0], k), np.float32)
    block = max(1, _EXACT_SCORE_ELEMENTS // chunk)
    for q0 in range(0, q_all.shape[0], block):
        q = q_all[q0 : q0 + block]
        best_s = np.full((q.shape[0], k), -np.inf, np.float32)
        best_i = np.full((q.shape[0], k), -1, np.int64)
        for c0 in range(0, n, chunk):
            v = np.asarray(vectors[c0 : c0 + chunk], dtype=np.float32)
            best_s, best_i = _merge_chunk(best_s, best_i, q @ v.T, c0)
        scores[q0 : q0 + block], ids[q0 : q0 + block] = best_s, best_i
    return ids, scores


# --- indexes --------------------------------------------------------------------------------------------------


def _write_meta(directory: PathLike, meta: dict[str, Any]) -> None:
    (as_path(directory) / "index.json").write_text(json.dumps({"format": INDEX_FORMAT, **meta}, indent=2) + "\n")


def _read_meta(directory: PathLike) -> dict[str, Any]:
    path = as_path(directory) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index.json (not a saved index)")
    meta = json.loads(path.read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: unsupported index format {meta.get('format')!r} (expected {INDEX_FORMAT})")
    return meta


class ExactIndex:
    """Exact search over a pool kept as given (float16 or float32)."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray, *, chunk: int = SearchConfig.exact_chunk) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must be a non-empty 2-D array, got shape {vectors.shape}")
        if vectors.dtype not in (np.float16, np.float32):
            vectors = np.asarray(vectors, dtype=np.float32)
        self.vectors = vectors
        self.chunk = chunk

    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_search(queries, self.vectors, k, chunk=self.chunk)

    def save(self, directory: PathLike, *, force: bool = False) -> None:
        """Write ``vectors.npy`` and ``index.json`` (atomically: the directory appears whole or not at all)."""
        with atomic_output_dir(directory, force=force) as tmp, (tmp / "vectors.npy").open("wb") as f:
            np.save(f, self.vectors)
            _write_meta(tmp, {"kind": self.kind, "size": self.size, "dim": self.dim, "chunk": self.chunk})

    @classmethod
    def load(cls, directory: PathLike, *, mmap: bool = False) -> ExactIndex:
        """Load a saved index; ``mmap=True`` maps the vectors instead of reading them into memory (on a
        local disk: memory-mapping needs a local file)."""
        meta = _read_meta(directory)
        if meta.get("kind") != cls.kind:
            raise ValueError(f"{directory}: index kind is {meta.get('kind')!r}, not {cls.kind!r}")
        path = as_path(directory) / "vectors.npy"
        if is_local(path):
            vectors = np.load(path, mmap_mode="r" if mmap else None)
        else:
            with path.open("rb") as f:
                vectors = np.load(f)
        return cls(vectors, chunk=int(meta["chunk"]))


class ScannIndex:
    """A ScaNN searcher (tree + asymmetric hashing + exact reordering) and the parameters it searches with."""

    kind = "scann"

    def __init__(self, searcher: Any, *, size: int, dim: int, params: dict[str, Any]) -> None:
        self.searcher = searcher
        self.size = size
        self.dim = dim
        self.params = dict(params)

    @classmethod
    def build(cls, vectors: np.ndarray, cfg: SearchConfig = _DEFAULT, *, k: int = 50) -> ScannIndex:
        """Train and build a searcher over ``vectors`` [n, d] with the parameters ``cfg.resolve(n, k)``."""
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must be a non-empty 2-D array, got shape {vectors.shape}")
        n, dim = vectors.shape
        p = cfg.resolve(n, k)
        p["anisotropic_quantization_threshold"] = cfg.anisotropic_quantization_threshold
        p["spherical"] = cfg.spherical
        # ScaNN's k-means re-seeds clusters smaller than this (default 50) while it trains on the sample. With ~64
        # sample points per leaf that re-seeding wrecked the leaves (1M x 1536: recall@10 0.93 against 0.99+ when
        # searching 8 of 2000 leaves), so keep it at 1/8 of the mean sample points per leaf.
        p["min_partition_size"] = max(1, min(50, p["training_sample_size"] // (8 * p["num_leaves"])))
        db = np.ascontiguousarray(vectors, dtype=np.float32)  # no copy for a C-contiguous float32 pool
        t0 = time.perf_counter()
        searcher = (
            _scann()
            .scann_ops_pybind.builder(db, k, "dot_product")
            .set_n_training_threads(_cpu_count())  # the default (0) trains the tree on one thread
            .tree(
                num_leaves=p["num_leaves"],
                num_leaves_to_search=p["num_leaves_to_search"],
                training_sample_size=p["training_sample_size"],
                min_partition_size=p["min_partition_size"],
                spherical=p["spherical"],
            )
            .score_ah(
                p["dimensions_per_block"],
                anisotropic_quantization_threshold=p["anisotropic_quantization_threshold"],
                training_sample_size=p["training_sample_size"],
            )
            .reorder(p["reorder"])
            .build()
        )
        build_s = time.perf_counter() - t0
        log.info("ScaNN index over %d x %d built in %.1f s: %s", n, dim, build_s, p)
        return cls(searcher, size=n, dim=dim, params=p)

    def search(
        self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None, reorder: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(ids int64 [Q, k], scores float32 [Q, k])``, scores the exact inner products of the
        reordered candidates, sorted descending (ties: lower id first). ``k`` above the pool size is cut to it;
        neighbours ScaNN did not find are id -1, score -inf (at the end of the row). ``leaves_to_search`` and
        ``reorder`` override the built parameters for this call (search-time knobs, no rebuild)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        leaves = leaves_to_search or self.params["num_leaves_to_search"]
        if not 0 < leaves <= self.params["num_leaves"]:
            raise ValueError(f"leaves_to_search must be in [1, {self.params['num_leaves']}], got {leaves}")
        k = min(k, self.size)
        reorder = max(reorder or self.params["reorder"], k)
        ids = np.empty((queries.shape[0], k), np.int64)
        scores = np.empty((queries.shape[0], k), np.float32)
        for q0 in range(0, queries.shape[0], _SCANN_QUERY_BATCH):
            q = np.ascontiguousarray(queries[q0 : q0 + _SCANN_QUERY_BATCH], dtype=np.float32)
            i, s = self.searcher.search_batched_parallel(
                q,
                final_num_neighbors=k,
                pre_reorder_num_neighbors=reorder,
                leaves_to_search=leaves,
            )
            i, s = _pad_result(np.asarray(i), np.asarray(s, np.float32), k)
            order = np.lexsort((i, -s), axis=1)  # descending score, then ascending id
            ids[q0 : q0 + len(q)] = np.take_along_axis(i, order, axis=1)
            scores[q0 : q0 + len(q)] = np.take_along_axis(s, order, axis=1)
        return ids, scores

    def save(self, directory: PathLike, *, force: bool = False) -> None:
        """Serialise the searcher (paths relative to the directory) and write ``index.json``, atomically."""
        with atomic_output_dir(directory, force=force) as tmp:
            if is_local(tmp):
                self.searcher.serialize(str(tmp), relative_path=True)
            else:  # ScaNN writes local files only: serialise to a local directory, then copy it up
                with tempfile.TemporaryDirectory(prefix="mmret-scann-") as local:
                    self.searcher.serialize(local, relative_path=True)
                    _copy_files(as_path(local), as_path(tmp))
            _write_meta(tmp, {"kind": self.kind, "size": self.size, "dim": self.dim, "params": self.params})

    @classmethod
    def load(cls, directory: PathLike) -> ScannIndex:
        meta = _read_meta(directory)
        if meta.get("kind") != cls.kind:
            raise ValueError(f"{directory}: index kind is {meta.get('kind')!r}, not {cls.kind!r}")
        if is_local(directory):
            searcher = _scann().scann_ops_pybind.load_searcher(str(directory))
        else:  # ScaNN reads local files only: copy the index down first
            with tempfile.TemporaryDirectory(prefix="mmret-scann-") as local:
                _copy_files(as_path(directory), as_path(local))
                searcher = _scann().scann_ops_pybind.load_searcher(local)
        return cls(searcher, size=int(meta["size"]), dim=int(meta["dim"]), params=meta["params"])


def _copy_files(src: epath.Path, dst: epath.Path) -> None:
    """Copy every file under ``src`` to the same relative path under ``dst`` (across file systems)."""
    for directory, _, files in src.walk():
        target = dst / directory.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            (directory / name).copy(target / name, overwrite=True)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _pad_result(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """ScaNN pads short results with id 0 and a NaN score, or returns fewer columns: make them id -1, score
    -inf, exactly ``k`` columns."""
    ids = ids.astype(np.int64)
    missing = ~np.isfinite(scores)
    ids[missing] = -1
    scores = np.where(missing, np.float32(-np.inf), scores)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids[:, :k], scores[:, :k]


def build_index(vectors: np.ndarray, cfg: SearchConfig = _DEFAULT, *, k: int = 50) -> ExactIndex | ScannIndex:
    """The index ``cfg`` asks for over ``vectors`` [n, d]: exact when ``method="exact"``, or ``"auto"`` and
    ``n < cfg.brute_force_below``; ScaNN otherwise. ``k`` is the number of neighbours searches will ask for
    (it scales ScaNN's reordering)."""
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty 2-D array, got shape {vectors.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    n = vectors.shape[0]
    if cfg.method == "exact" or (cfg.method == "auto" and n < cfg.brute_force_below):
        log.info(
            "exact index over %d x %d (method=%s, brute_force_below=%d)",
            n,
            vectors.shape[1],
            cfg.method,
            cfg.brute_force_below,
        )
        return ExactIndex(vectors, chunk=cfg.exact_chunk)
    return ScannIndex.build(vectors, cfg, k=k)


def load_index(directory: PathLike) -> ExactIndex | ScannIndex:
    """Load an index saved by ``ExactIndex.save`` or ``ScannIndex.save`` (its ``index.json`` names the kind)."""
    kind = _read_meta(directory).get("kind")
    if kind == ExactIndex.kind:
        return ExactIndex.load(directory)
    if kind == ScannIndex.kind:
        return ScannIndex.load(directory)
    raise ValueError(f"{directory}: unknown index kind {kind!r}")


# --- recall against exact search ------------------------------------------------------------------------------


def recall_against_exact(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |top-k approx ∩ top-k exact| / k (k cut to the exact list's length; ids -1, which
    mark missing neighbours, never count)."""
    if approx_ids.ndim != 2 or exact_ids.ndim != 2 or approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"id arrays must be [Q, *] with the same Q, got {approx_ids.shape} and {exact_ids.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if exact_ids.shape[0] == 0:
        raise ValueError("no queries")
    k = min(k, exact_ids.shape[1])
    hits = 0
    for r0 in range(0, exact_ids.shape[0], 4096):
        a = approx_ids[r0 : r0 + 4096, :k]
        e = exact_ids[r0 : r0 + 4096, :k]
        found = (e[:, :, None] == a[:, None, :]).any(axis=2) & (e >= 0)
        hits += int(found.sum())
    return hits / (exact_ids.shape[0] * k)


def check_exact(
    index: ExactIndex | ScannIndex, vectors: np.ndarray, queries: np.ndarray, n: int, *, k: int = 10, seed: int = 0
) -> float:
    """Recall@k of ``index`` against exact search over ``vectors`` on ``n`` queries sampled without replacement
    (seeded; all of them when ``n >= len(queries)``)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    picked = queries if n >= len(queries) else queries[np.sort(rng.choice(len(queries), size=n, replace=False))]
    approx, _ = index.search(picked, k)
    exact, _ = exact_search(picked, vectors, k)
    recall = recall_against_exact(approx, exact, k)
    log.info("recall@%d against exact search on %d queries: %.4f", k, len(picked), recall)
    return recall
