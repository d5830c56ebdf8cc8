"""grain pipelines: examples of one or several stores -> processed, padded batches of static shape.

Stores (:mod:`mmret.data.stores`) give source-neutral examples (:mod:`mmret.data.example`); the
pipelines only render them (instruction -> template -> tokens, image -> patches) and batch.

Training: an example is a query, one positive (sampled among its positives) and ``num_negatives`` hard
negatives (sampled from the query's list in the store's negatives file when it has one, else from the
example's own negatives: M-BEIR's labelled ``neg_cand_list``). Batches have static shapes declared in
:class:`PipelineConfig` (a fixed length per sequence and a fixed budget of image patches per batch), so
one compiled step serves the whole run.

Determinism and resumption: the order is a grain shuffle of the query indices for ``seed``; every
random choice of an example comes from grain's per-index generator, so an example depends only on
(seed, epoch, index). The iterator's state (``get_state`` / ``set_state``) is checkpointable and a
restored iterator yields exactly the batches the uninterrupted one would have. Hosts take disjoint
slices (``jax.process_index()`` / ``jax.process_count()``) of the same global order.

Mixing (:func:`mixed_train_dataset`): several stores with weights, through grain's ``MapDataset.mix``.
Each source is its own single-source stream (shuffled with ``seed + i``, its own epochs and per-index
draws, sliced per host), and the mix interleaves them deterministically in proportion to the weights;
the mixed stream is still index-addressable, so its iterator state is as small and exact as a single
source's. One source of any weight is exactly :func:`train_dataset`'s stream.

Bad input: records are validated when read (policy ``on_bad_record``). A record that fails later, in
a worker (an image that is missing, corrupt, outside the root or too large), raises
:class:`BadRecordError` naming the record under ``"error"``; under ``"skip"`` the example is replaced
by the next index's of the same source (deterministically) and the skip travels with the batch
(``batch["meta"]["bad_records"]``) so the main process can count and report it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from mmret.data import packing
from mmret.data.bad_records import BAD_IMAGE, BadRecordError, BadRecords, OnBadRecord
from mmret.data.example import Example, Part, encode_part
from mmret.data.images import DEFAULT_MAX_PIXELS, BadImageError
from mmret.data.packing import PackingConfig
from mmret.data.processor import PaddingSide, ProcessedExample, Processor
from mmret.data.sources.mbeir import as_store
from mmret.data.stores import Store

__all__ = [
    "MAX_REPLACEMENTS",
    "NO_NEGATIVES",
    "EncodeTrainExample",
    "PipelineConfig",
    "TrainExample",
    "candidate_dataset",
    "collate_train",
    "encode_dataset",
    "iterate",
    "mixed_epoch_length",
    "mixed_train_dataset",
    "query_dataset",
    "train_dataset",
]

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
    # Sequence packing per side (mmret.data.packing): the row counts a batch (a GradCache chunk) may take, rows
    # of max_query_length / max_candidate_length tokens; rows=() pads one example a row.
    query_packing: PackingConfig = PackingConfig()
    candidate_packing: PackingConfig = PackingConfig()

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

    def __init__(self, store: Store, processor: Processor, cfg: PipelineConfig):
        self.store, self.processor, self.cfg = as_store(store), processor, cfg

    def __call__(self, item: tuple[int, int], rng: np.random.Generator) -> TrainExample:
        index, epoch = item
        bad = BadRecords(self.cfg.on_bad_record)
        queries = self.store.queries
        n = len(queries)
        for attempt in range(MAX_REPLACEMENTS):
            try:
                record = queries[(index + attempt) % n]
                example = self.store.query_example(record, seed=self.cfg.instruction_seed, epoch=epoch)
                encoded = self._encode(example, rng)
            except BadRecordError as e:
                bad.handle(e)  # raises under "error"
                continue
            encoded.bad = bad
            return encoded
        raise RuntimeError(f"{MAX_REPLACEMENTS} bad records in a row from index {index}: {bad.report()}")

    def _image(self, key: str | None, what: str) -> Image.Image | None:
        if key is None:
            return None
        try:
            return self.store.image(key, max_pixels=self.cfg.max_decode_pixels)
        except BadImageError as e:
            raise BadRecordError(what, BAD_IMAGE, str(e)) from e

    def _candidate(self, cid: str) -> ProcessedExample:
        part = self.store.candidate_part(cid)
        return encode_part(part, self.processor, self._image(part.image, f"candidate {cid}"))

    def negatives_of(self, example: Example) -> list[str]:
        """The example's listed negatives (the store's negatives file, else its own) that are not positives;
        a :class:`BadRecordError` when none is left."""
        file = self.store.negatives
        listed = example.negatives if file is None else file.get(example.id, ())
        pool = [d for d in listed if d not in example.positives]
        if not pool:
            where = "its neg_cand_list (no negatives file given)" if file is None else "the negatives file"
            raise BadRecordError(f"query {example.id}", NO_NEGATIVES, f"no hard negatives in {where}")
        return pool

    def _encode(self, example: Example, rng: np.random.Generator) -> TrainExample:
        positives = example.positives
        positive = positives[int(rng.integers(len(positives)))]
        negatives: list[str] = []
        if self.cfg.num_negatives:
            pool = self.negatives_of(example)
            replace = len(pool) < self.cfg.num_negatives
            picks = rng.choice(len(pool), self.cfg.num_negatives, replace=replace)
            negatives = [pool[int(i)] for i in picks]
        query = example.query
        image = self._image(query.image, f"{example.where or 'query'} (query {example.id})")
        encoded = encode_part(query, self.processor, image)
        dids = [positive, *negatives]
        return TrainExample(
            query=encoded,
            candidates=[self._candidate(d) for d in dids],
            qid=example.id,
            dids=dids,
            positives=frozenset(positives),
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

    def side(
        pick: Callable[[TrainExample], list[ProcessedExample]], length: int, patches: int, packs: PackingConfig
    ) -> dict[str, Any]:
        groups = [[e for ex in examples[i * per : (i + 1) * per] for e in pick(ex)] for i in range(n)]
        chunks = [collate_side(g, processor, packs, max_length=length, max_patches=patches // n) for g in groups]
        if cfg.grad_cache_chunk is None:
            return chunks[0]
        return packing.stack_chunks(chunks, processor.pad_token_id)

    batch: dict[str, Any] = {
        "query": side(lambda ex: [ex.query], cfg.max_query_length, cfg.max_query_patches, cfg.query_packing),
        "candidates": side(
            lambda ex: ex.candidates, cfg.max_candidate_length, cfg.max_candidate_patches, cfg.candidate_packing
        ),
        "positive_mask": np.array([[d in ex.positives for d in dids] for ex in examples], dtype=bool),
    }
    batch["meta"] = {
        "qids": [ex.qid for ex in examples],
        "dids": dids,
        "positives": [ex.positives for ex in examples],  # across processes (mmret.tasks.bi_encoder.task)
        "bad_records": BadRecords(cfg.on_bad_record).merge(ex.bad for ex in examples),
    }
    return batch


def collate_side(
    examples: Sequence[ProcessedExample],
    processor: Processor,
    packs: PackingConfig | None,
    *,
    max_length: int,
    max_patches: int,
    padding_side: PaddingSide = "right",
) -> dict[str, Any]:
    """One side of a batch: packed rows when ``packs`` is enabled, else one padded row an example. Grid rows:
    one per image plus the filler, rounded to 2x the sequences so that they split evenly over the batch shards
    wherever the sequences do (hosts concatenate their blocks)."""
    if packs is not None and packs.enabled:
        return packing.pack(
            examples,
            packs,
            row_length=max_length,
            max_patches=max_patches,
            max_images=2 * len(examples),
            pad_token_id=processor.pad_token_id,
            patch_dim=processor.patcher.patch_dim,
        )
    images = 2 * len(examples)
    return processor.collate(
        examples, max_length=max_length, max_patches=max_patches, max_images=images, padding_side=padding_side
    )


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


class _WithEpoch:
    """grain map_with_index: (position in the repeated order, query index) -> (query index, epoch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, position: int, index: int) -> tuple[int, int]:
        return index, position // self.n


#: ``(store, processor, cfg) -> grain random map`` of (query index, epoch): how a task encodes its examples.
ExampleFn = Callable[[Store, Processor, PipelineConfig], Any]
#: ``(examples, processor, cfg) -> host batch``: how a task collates them.
BatchFn = Callable[[Sequence[Any], Processor, PipelineConfig], dict[str, Any]]


def _source_examples(
    store: Store,
    seed: int,
    processor: Processor,
    cfg: PipelineConfig,
    process_index: int | None,
    process_count: int | None,
    example_fn: ExampleFn,
) -> grain.MapDataset:
    """One store's training examples on this host: its shuffled query order for ``seed``, repeated for
    ``cfg.num_epochs``, each example encoded from grain's generator of its index in that global order, then
    this host's slice (so an example's draws, its positive and negatives, do not depend on the number of hosts:
    N hosts' batches together are one host's)."""
    n = len(store.queries)
    ds = grain.MapDataset.source(range(n)).seed(seed)
    if cfg.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(cfg.num_epochs).map_with_index(_WithEpoch(n))  # (query index, epoch)
    ds = ds.random_map(example_fn(store, processor, cfg))
    return _host_slice(ds, process_index, process_count)


def _check_sources(sources: Sequence[tuple[Store, float]]) -> None:
    if not sources:
        raise ValueError("no training sources")
    for i, (store, weight) in enumerate(sources):
        if not (isinstance(weight, numbers.Real) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"training source {i}: weight must be a positive number, got {weight!r}")
        if not len(store.queries):
            raise ValueError("no training queries" if len(sources) == 1 else f"training source {i}: no queries")


def mixed_train_dataset(
    sources: Sequence[tuple[Store, float]],
    processor: Processor,
    cfg: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    example_fn: ExampleFn = EncodeTrainExample,
    batch_fn: BatchFn = collate_train,
) -> grain.IterDataset:
    """The training pipeline over ``(store, weight)`` sources, as a grain ``IterDataset`` (iterate it; the
    iterator is checkpointable: ``get_state`` / ``set_state``, restored bitwise). ``example_fn`` /
    ``batch_fn``: how examples are encoded and collated (default: the bi-encoder's query and candidates).

    Source ``i`` is the single-source stream of its store shuffled with ``cfg.seed + i`` (so its examples
    come in the same order, with the same draws, whatever it is mixed with); ``grain.MapDataset.mix``
    interleaves the sources' examples deterministically, source ``i`` giving ``weight_i / sum(weights)``
    of every prefix of the stream (grain rounds the weights to integer proportions, the smallest to 100:
    a prefix of ``k`` examples holds within one example of ``k * p_i / sum(p)`` from source ``i``), and the
    batches are cut from the mixed stream. Each host mixes its own slices of the sources. With
    ``cfg.num_epochs`` set, the stream ends when the first source runs out (:func:`mixed_epoch_length`);
    ``None`` repeats every source forever. A checkpointed state resumes only the same sources, weights
    and config (it is a position in this stream).
    """
    _check_sources(sources)
    parts = [
        _source_examples(store, cfg.seed + i, processor, cfg, process_index, process_count, example_fn)
        for i, (store, _) in enumerate(sources)
    ]
    ds = grain.MapDataset.mix(parts, [float(w) for _, w in sources])
    ds = ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=lambda exs: batch_fn(exs, processor, cfg))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches * cfg.batch_size)
    return _prefetch(ds.to_iter_dataset(read), cfg.num_workers, cfg.worker_buffer_size)


def train_dataset(
    store: Store,
    processor: Processor,
    cfg: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The training pipeline of one store (:func:`mixed_train_dataset` of that store alone)."""
    return mixed_train_dataset([(store, 1.0)], processor, cfg, process_index=process_index, process_count=process_count)


def mixed_epoch_length(sizes: Sequence[int], weights: Sequence[float]) -> int:
    """The examples a mix of sources of ``sizes`` queries yields (before batching, on one host; each of
    ``P`` hosts yields about ``1/P`` of it) until its first source has been read once: grain's own length
    of the mix of one epoch of each (a pipeline with ``num_epochs=1`` ends there)."""
    if len(sizes) != len(weights) or not sizes:
        raise ValueError(f"{len(sizes)} source sizes for {len(weights)} weights")
    return len(grain.MapDataset.mix([grain.MapDataset.range(n) for n in sizes], [float(w) for w in weights]))


def encode_dataset(
    items: Sequence[Any],
    encode: Callable[[Any], tuple[str, ProcessedExample]],
    *,
    batch_size: int,
    max_length: int,
    max_patches: int,
    processor: Processor,
    padding_side: PaddingSide = "right",
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    packs: PackingConfig | None = None,
) -> grain.IterDataset:
    """Ordered, static-shape batches of ``encode(item) -> (id, processed)`` for embedding queries or a
    pool: every item exactly once (this host's slice), the last batch padded with copies flagged ``valid = 0``;
    packed rows of ``max_length`` tokens when ``packs`` is enabled.

    An item may be ``None``: a padding slot (``valid = 0``), so that callers can give every host the
    same number of batches. ``meta["ids"]`` lists the ids of the valid rows, in row order."""
    # Indices, not the items: grain treats a None element as filtered out.
    ds = _host_slice(grain.MapDataset.range(len(items)), process_index, process_count)
    filler: list[ProcessedExample] = []  # for a batch of padding slots only: the first real item, encoded once

    def fill() -> ProcessedExample:
        if not filler:
            filler.append(encode(next(i for i in items if i is not None))[1])
        return filler[0]

    def one(index: int) -> tuple[str | None, ProcessedExample | None]:
        item = items[index]
        return (None, None) if item is None else encode(item)

    def batch_fn(chunk: Sequence[tuple[str | None, ProcessedExample | None]]) -> dict[str, Any]:
        real = [e for _, e in chunk if e is not None]
        pad = real[-1] if real else fill()
        examples = [pad if e is None else e for _, e in chunk] + [pad] * (batch_size - len(chunk))
        out = collate_side(
            examples, processor, packs, max_length=max_length, max_patches=max_patches, padding_side=padding_side
        )
        out["valid"] = np.array([i is not None for i, _ in chunk] + [False] * (batch_size - len(chunk)))
        out["meta"] = {"ids": [i for i, _ in chunk if i is not None]}
        return out

    ds = ds.map(one).batch(batch_size, batch_fn=batch_fn)
    return _prefetch(ds.to_iter_dataset(), num_workers)


def _encode_for_eval(store: Store, part: Part, processor: Processor, max_decode_pixels: int) -> ProcessedExample:
    image = None if part.image is None else store.image(part.image, max_pixels=max_decode_pixels)
    return encode_part(part, processor, image, for_eval=True)


def query_dataset(
    store: Store,
    processor: Processor,
    *,
    queries: Sequence[Any | None] | None = None,
    instruction_seed: int = 0,
    max_decode_pixels: int = DEFAULT_MAX_PIXELS,
    **kw: Any,
) -> grain.IterDataset:
    """Embedding pipeline over the query records ``queries`` (default ``store.queries``; ``None`` entries
    are padding slots, see :func:`encode_dataset`), with their instructions (one draw per query, epoch 0)."""
    store = as_store(store)

    def encode(record: Any) -> tuple[str, ProcessedExample]:
        example = store.query_example(record, seed=instruction_seed)
        return example.id, _encode_for_eval(store, example.query, processor, max_decode_pixels)

    items = store.queries if queries is None else queries
    return encode_dataset(items, encode, processor=processor, **kw)


def candidate_dataset(
    store: Store,
    dids: Sequence[str | None],
    processor: Processor,
    *,
    max_decode_pixels: int = DEFAULT_MAX_PIXELS,
    **kw: Any,
) -> grain.IterDataset:
    """Embedding pipeline over the candidates ``dids`` (no instruction; ``None``: a padding slot)."""
    store = as_store(store)

    def encode(did: str) -> tuple[str, ProcessedExample]:
        return did, _encode_for_eval(store, store.candidate_part(did), processor, max_decode_pixels)

    return encode_dataset(dids, encode, processor=processor, **kw)


def iterate(dataset: grain.IterDataset, bad: BadRecords | None = None) -> Iterator[dict[str, Any]]:
    """Iterate a training dataset, folding each batch's skipped records into ``bad``."""
    for batch in dataset:
        if bad is not None:
            bad.merge([batch["meta"]["bad_records"]])
        yield batch
