"""grain pipelines: M-BEIR records -> processed, padded batches of static shape.

Training: an example is a query, one positive (sampled among its positives) and ``num_negatives`` hard
negatives (sampled from the query's list in the negatives file when the config names one, else from the
query's own ``neg_cand_list``, M-BEIR's labelled hard negatives). Batches
have static shapes declared in :class:`PipelineConfig` (a fixed length per sequence and a fixed budget
of image patches per batch), so one compiled step serves the whole run.

Determinism and resumption: the order is a grain shuffle of the query indices for ``seed``; every
random choice of an example comes from grain's per-index generator, so an example depends only on
(seed, epoch, index). The iterator's state (``get_state`` / ``set_state``) is checkpointable and a
restored iterator yields exactly the batches the uninterrupted one would have. Hosts take disjoint
slices (``jax.process_index()`` / ``jax.process_count()``) of the same global order.

Bad input: records are validated when read (policy ``on_bad_record``). A record that fails later, in
a worker (an image that is missing, corrupt, outside the root or too large), raises
:class:`BadRecordError` naming the record under ``"error"``; under ``"skip"`` the example is replaced
by the next index's (deterministically) and the skip travels with the batch
(``batch["meta"]["bad_records"]``) so the main process can count and report it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import grain
import numpy as np
from PIL import Image

from mmret.data.bad_records import BAD_IMAGE, BadRecordError, BadRecords, OnBadRecord
from mmret.data.images import DEFAULT_MAX_PIXELS, BadImageError, load_image
from mmret.data.mbeir import (
    EVAL_TASKS,
    Candidate,
    DatasetTask,
    Instructions,
    Query,
    candidate_text,
    global_pool_path,
    instructions_path,
    query_text_parts,
    read_instructions,
    read_local_pool,
    read_pool,
    read_queries,
    read_union_queries,
    union_file,
)
from mmret.data.negatives import read_negatives
from mmret.data.processor import PaddingSide, ProcessedExample, Processor

NO_NEGATIVES = "no_negatives"
#: How many following indices a skipped training example may be replaced by before giving up.
MAX_REPLACEMENTS = 64


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Batch shapes and sampling. Lengths are per sequence, patch budgets per batch (all static)."""

    batch_size: int = 8  # per host
    num_negatives: int = 0
    max_query_length: int = 512
    max_candidate_length: int = 512
    max_query_patches: int = 8 * 1200  # 1200 patches = one image at U-MARVEL's 300-token cap
    max_candidate_patches: int = 8 * 1200
    padding_side: PaddingSide = "right"
    seed: int = 0
    instruction_seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    num_workers: int = 0  # grain worker processes (0: in the main process)
    worker_buffer_size: int = 2
    read_threads: int = 1  # threads per process mapping examples (more contend for the GIL; scale with workers)
    prefetch_batches: int = 2
    on_bad_record: OnBadRecord = "error"
    max_decode_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb cap
    grad_cache_chunk: int | None = None  # queries per chunk: collate in chunks for a GradCache step

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_query_length", "max_candidate_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pipeline config: {name} must be positive, got {getattr(self, name)}")
        if self.num_negatives < 0:
            raise ValueError(f"pipeline config: num_negatives must be >= 0, got {self.num_negatives}")
        if self.grad_cache_chunk is not None:
            n = self.batch_size // self.grad_cache_chunk if self.grad_cache_chunk > 0 else 0
            if n == 0 or self.batch_size % self.grad_cache_chunk:
                chunk, batch = self.grad_cache_chunk, self.batch_size
                raise ValueError(f"pipeline config: grad_cache_chunk={chunk} must divide batch_size={batch}")
            for name in ("max_query_patches", "max_candidate_patches"):
                if getattr(self, name) % (4 * n):
                    raise ValueError(f"pipeline config: {name} must be a multiple of 4 * {n} chunks")


class RecordStore(Protocol):
    """Where examples come from: a raw M-BEIR root or an ArrayRecord build (same records, same images)."""

    queries: Sequence[Query]
    negatives: Mapping[str, tuple[str, ...]] | None  # None: no negatives file (queries' neg_cand_list)
    instructions: Instructions | None

    def candidate(self, did: str) -> Candidate: ...

    def image(self, path: str, *, max_pixels: int) -> Image.Image: ...


class RawStore:
    """An M-BEIR root on disk: queries of one split, the candidates they need, images read on demand.

    Queries come from the split's union file when there is one (:func:`union_file`; up-sampled copies are
    separate examples) against the union pool, else from the per-task files; ``tasks`` keeps only those
    dataset-tasks either way.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str | DatasetTask] | None = None,
        *,
        negatives_file: str | Path | None = None,
        bad: BadRecords | None = None,
        query_file: str = "auto",
    ):
        self.root = Path(root)
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


@dataclasses.dataclass
class TrainExample:
    """One processed training example plus what the batch needs to know about it."""

    query: ProcessedExample
    candidates: list[ProcessedExample]  # the positive, then the negatives
    qid: str
    dids: list[str]
    positives: frozenset[str]
    bad: BadRecords


class EncodeTrainExample:
    """grain random map: (query index, epoch) -> :class:`TrainExample` (with skip-and-replace on bad
    records). The epoch keys the query's instruction draw (a fresh one each epoch, as UniIR's)."""

    def __init__(self, store: RecordStore, processor: Processor, cfg: PipelineConfig):
        self.store, self.processor, self.cfg = store, processor, cfg

    def __call__(self, item: tuple[int, int], rng: np.random.Generator) -> TrainExample:
        index, epoch = item
        bad = BadRecords(self.cfg.on_bad_record)
        n = len(self.store.queries)
        for attempt in range(MAX_REPLACEMENTS):
            try:
                example = self._encode(self.store.queries[(index + attempt) % n], rng, epoch)
            except BadRecordError as e:
                bad.handle(e)  # raises under "error"
                continue
            example.bad = bad
            return example
        raise RuntimeError(f"{MAX_REPLACEMENTS} bad records in a row from index {index}: {bad.report()}")

    def _image(self, path: str | None, what: str) -> Image.Image | None:
        if path is None:
            return None
        try:
            return self.store.image(path, max_pixels=self.cfg.max_decode_pixels)
        except BadImageError as e:
            raise BadRecordError(what, BAD_IMAGE, str(e)) from e

    def _candidate(self, did: str) -> ProcessedExample:
        cand = self.store.candidate(did)
        image = self._image(cand.image_path, f"candidate {did}")
        return self.processor(text=candidate_text(cand) or None, image=image)

    def _encode(self, query: Query, rng: np.random.Generator, epoch: int = 0) -> TrainExample:
        positive = query.pos_cand_list[int(rng.integers(len(query.pos_cand_list)))]
        negatives: list[str] = []
        if self.cfg.num_negatives:
            file = self.store.negatives
            listed = query.neg_cand_list if file is None else file.get(query.qid, ())
            pool = [d for d in listed if d not in query.pos_cand_list]
            if not pool:
                where = "its neg_cand_list (no negatives file given)" if file is None else "the negatives file"
                raise BadRecordError(f"query {query.qid}", NO_NEGATIVES, f"no hard negatives in {where}")
            replace = len(pool) < self.cfg.num_negatives
            picks = rng.choice(len(pool), self.cfg.num_negatives, replace=replace)
            negatives = [pool[int(i)] for i in picks]
        instruction, text = query_text_parts(
            query, self.store.instructions, seed=self.cfg.instruction_seed, epoch=epoch
        )
        image = self._image(query.image_path, f"{query.where or 'query'} (query {query.qid})")
        encoded = self.processor(text=text or None, image=image, instruction=instruction or None)
        dids = [positive, *negatives]
        return TrainExample(
            query=encoded,
            candidates=[self._candidate(d) for d in dids],
            qid=query.qid,
            dids=dids,
            positives=frozenset(query.pos_cand_list),
            bad=BadRecords(self.cfg.on_bad_record),
        )


def collate_train(examples: Sequence[TrainExample], processor: Processor, cfg: PipelineConfig) -> dict[str, Any]:
    """Static-shape batch: ``query`` and ``candidates`` (B * (1 + num_negatives), positives first per
    query) as :func:`mmret.data.processor.collate` dicts, ``positive_mask`` [B, C] (candidate c is a
    labelled positive of query b: not a negative for it), and host-only ``meta``.

    With ``grad_cache_chunk`` every query / candidate array gets a leading [B / chunk] axis: chunk i
    holds queries i*chunk.. and their candidates, each chunk padded to its share of the budgets.
    """
    dids = [d for ex in examples for d in ex.dids]
    n = 1 if cfg.grad_cache_chunk is None else len(examples) // cfg.grad_cache_chunk
    per = len(examples) // n

    def side(pick: Callable[[TrainExample], list[ProcessedExample]], length: int, patches: int) -> dict[str, Any]:
        groups = [[e for ex in examples[i * per : (i + 1) * per] for e in pick(ex)] for i in range(n)]
        # Grid rows: one per image plus the filler, rounded to 2x the sequences so the rows split evenly
        # over the batch shards wherever the sequences do (hosts concatenate their blocks).
        chunks = [
            processor.collate(
                group,
                max_length=length,
                max_patches=patches // n,
                max_images=2 * len(group),
                padding_side=cfg.padding_side,
            )
            for group in groups
        ]
        if cfg.grad_cache_chunk is None:
            return chunks[0]
        return {k: np.stack([c[k] for c in chunks]) for k in chunks[0]}

    batch: dict[str, Any] = {
        "query": side(lambda ex: [ex.query], cfg.max_query_length, cfg.max_query_patches),
        "candidates": side(lambda ex: ex.candidates, cfg.max_candidate_length, cfg.max_candidate_patches),
        "positive_mask": np.array([[d in ex.positives for d in dids] for ex in examples], dtype=bool),
    }
    batch["meta"] = {
        "qids": [ex.qid for ex in examples],
        "dids": dids,
        "bad_records": BadRecords(cfg.on_bad_record).merge(ex.bad for ex in examples),
    }
    return batch


def _host_slice(ds: grain.MapDataset, process_index: int | None, process_count: int | None) -> grain.MapDataset:
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    return ds[process_index::process_count] if process_count > 1 else ds


def _prefetch(it: grain.IterDataset, num_workers: int, buffer_size: int = 2) -> grain.IterDataset:
    """Move the work into ``num_workers`` grain processes (none: stay in this process)."""
    if num_workers <= 0:
        return it
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags; a library user may never have parsed them
        flags.FLAGS.mark_as_parsed()
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer_size))


def train_dataset(
    store: RecordStore,
    processor: Processor,
    cfg: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The training pipeline as a grain ``IterDataset`` (iterate it; the iterator is checkpointable)."""
    if not store.queries:
        raise ValueError("no training queries")
    ds = grain.MapDataset.source(range(len(store.queries))).seed(cfg.seed)
    if cfg.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(cfg.num_epochs)
    n = len(store.queries)
    ds = ds.map_with_index(lambda position, index: (index, position // n))  # (query index, epoch)
    ds = _host_slice(ds, process_index, process_count)
    ds = ds.random_map(EncodeTrainExample(store, processor, cfg))
    ds = ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=lambda exs: collate_train(exs, processor, cfg))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches * cfg.batch_size)
    return _prefetch(ds.to_iter_dataset(read), cfg.num_workers, cfg.worker_buffer_size)


def encode_dataset(
    items: Sequence[Any],
    encode: Callable[[Any], ProcessedExample],
    ids: Callable[[Any], str],
    *,
    batch_size: int,
    max_length: int,
    max_patches: int,
    processor: Processor,
    padding_side: PaddingSide = "right",
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Ordered, static-shape batches of ``encode(item)`` for embedding queries or a pool: every item
    exactly once (this host's slice), the last batch padded with copies flagged ``valid = 0``.

    An item may be ``None``: a padding slot (``valid = 0``), so that callers can give every host the
    same number of batches. ``meta["ids"]`` lists the ids of the valid rows, in row order."""
    # Indices, not the items: grain treats a None element as filtered out.
    ds = _host_slice(grain.MapDataset.range(len(items)), process_index, process_count)
    filler: list[ProcessedExample] = []  # for a batch of padding slots only: the first real item, encoded once

    def fill() -> ProcessedExample:
        if not filler:
            filler.append(encode(next(i for i in items if i is not None)))
        return filler[0]

    def one(index: int) -> tuple[str | None, ProcessedExample | None]:
        item = items[index]
        return (None, None) if item is None else (ids(item), encode(item))

    def batch_fn(chunk: Sequence[tuple[str | None, ProcessedExample | None]]) -> dict[str, Any]:
        real = [e for _, e in chunk if e is not None]
        pad = real[-1] if real else fill()
        examples = [pad if e is None else e for _, e in chunk] + [pad] * (batch_size - len(chunk))
        out = processor.collate(  # 2 image rows per example (as in training): divisible like the batch
            examples,
            max_length=max_length,
            max_patches=max_patches,
            max_images=2 * batch_size,
            padding_side=padding_side,
        )
        out["valid"] = np.array([i is not None for i, _ in chunk] + [False] * (batch_size - len(chunk)))
        out["meta"] = {"ids": [i for i, _ in chunk if i is not None]}
        return out

    ds = ds.map(one).batch(batch_size, batch_fn=batch_fn)
    return _prefetch(ds.to_iter_dataset(), num_workers)


def query_dataset(
    store: RecordStore,
    processor: Processor,
    *,
    queries: Sequence[Query | None] | None = None,
    instruction_seed: int = 0,
    max_decode_pixels: int = DEFAULT_MAX_PIXELS,
    **kw: Any,
) -> grain.IterDataset:
    """Embedding pipeline over ``queries`` (default ``store.queries``; ``None`` entries are padding
    slots, see :func:`encode_dataset`), with their instructions."""

    def encode(query: Query) -> ProcessedExample:
        instruction, text = query_text_parts(query, store.instructions, seed=instruction_seed)
        image = None if query.image_path is None else store.image(query.image_path, max_pixels=max_decode_pixels)
        return processor(text=text or None, image=image, instruction=instruction or None, for_eval=True)

    items = store.queries if queries is None else queries
    return encode_dataset(items, encode, lambda q: q.qid, processor=processor, **kw)


def candidate_dataset(
    store: RecordStore,
    dids: Sequence[str | None],
    processor: Processor,
    *,
    max_decode_pixels: int = DEFAULT_MAX_PIXELS,
    **kw: Any,
) -> grain.IterDataset:
    """Embedding pipeline over the candidates ``dids`` (no instruction; ``None``: a padding slot)."""

    def encode(did: str) -> ProcessedExample:
        cand = store.candidate(did)
        image = None if cand.image_path is None else store.image(cand.image_path, max_pixels=max_decode_pixels)
        return processor(text=candidate_text(cand) or None, image=image, for_eval=True)

    return encode_dataset(dids, encode, lambda d: d, processor=processor, **kw)


def iterate(dataset: grain.IterDataset, bad: BadRecords | None = None) -> Iterator[dict[str, Any]]:
    """Iterate a training dataset, folding each batch's skipped records into ``bad``."""
    for batch in dataset:
        if bad is not None:
            bad.merge([batch["meta"]["bad_records"]])
        yield batch
