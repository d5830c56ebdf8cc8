"""The bi-encoder task: embed queries and candidates with one encoder, InfoNCE over the global batch.

Its batch contract (one place): the pipeline (:func:`mmret.data.pipeline.train_dataset`) collates per
process ``query`` and ``candidates`` (dicts of token / patch arrays; the positive of query ``b`` is
candidate ``b * C / B``, its mined negatives after it) and ``positive_mask`` [B, C] (every labelled positive
of each query among this process's candidates). With GradCache the batch arrives in chunks: every query /
candidate array gains a leading chunk axis (``position_ids``: the chunk axis is 1 of [3, ...] -> axis 1, and
examples on axis 2). :meth:`BiEncoder.global_arrays` lays the processes' blocks into global arrays
(:func:`global_positive_mask`) and the step reshapes the mask to [global queries, global candidates].

The step itself is :mod:`mmret.tasks.bi_encoder.step`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from mmret import build, checkpoints, multihost, sharding
from mmret.data import packing
from mmret.data.bad_records import BadRecords
from mmret.data.pipeline import mixed_epoch_length, mixed_train_dataset
from mmret.models.retriever import Retriever
from mmret.recipe import TrainerConfig, step_pipeline
from mmret.tasks.base import StepFn, TrainState
from mmret.tasks.bi_encoder.step import StepConfig, make_train_step

# ======================================================================================= the batch layout


def global_positive_mask(local: np.ndarray, n_chunks: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's block of the global ``positive_mask``, laid out [chunks, queries, chunks,
    candidates] so that the blocks of all processes, concatenated along axis 1 (the query rows) and
    reshaped to 2-D, index queries and candidates in the order of the global embeddings: chunk-major,
    then process, then row (with one chunk: process-major). Other processes' candidates get False: the
    layout of a batch without its queries' positives in ``meta`` (:func:`exchanged_positive_mask` marks them)."""
    rows, cols = local.shape
    qc, cc = rows // n_chunks, cols // n_chunks
    out = np.zeros((n_chunks, qc, n_chunks, process_count, cc), dtype=bool)
    out[:, :, :, process_index] = local.reshape(n_chunks, qc, n_chunks, cc)
    return out.reshape(n_chunks, qc, n_chunks, process_count * cc)


def id_hashes(ids: list[str]) -> np.ndarray:
    """A 64-bit hash of each id (int64), to compare ids across processes as numbers."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little", signed=True) for i in ids],
        dtype=np.int64,
    )


def exchanged_positive_mask(positives: list[frozenset[str]], every_did: np.ndarray, n_chunks: int) -> np.ndarray:
    """This process's block of the global ``positive_mask`` from its queries' labelled ``positives`` and every
    process's candidate ids (``every_did`` [processes, candidates]: :func:`id_hashes`), in
    :func:`global_positive_mask`'s layout; a positive another process holds (a copy of the same candidate) is
    marked too, as one process would mark it."""
    procs, cols = every_did.shape
    cc = cols // n_chunks
    order = every_did.reshape(procs, n_chunks, cc).transpose(1, 0, 2).reshape(-1)  # chunk, process, row
    columns: dict[int, list[int]] = {}  # id hash -> its columns (a candidate may stand in several places)
    for j, h in enumerate(order.tolist()):
        columns.setdefault(h, []).append(j)
    rows = np.zeros((len(positives), order.size), dtype=bool)
    for q, pos in enumerate(positives):  # O(candidates + positives) a step, not their product
        for h in id_hashes(sorted(pos)).tolist():
            rows[q, columns.get(h, [])] = True
    return rows.reshape(n_chunks, len(positives) // n_chunks, n_chunks, procs * cc)


def batch_axes(arrays: dict[str, Any], n_chunks: int) -> dict[str, int]:
    """The batch axis of each array of a batch (``positive_mask``: its query rows, axis 1 of the
    :func:`global_positive_mask` layout); GradCache chunks put the examples on axis 1 (``position_ids``: 2)."""
    axes = {"positive_mask": 1, **sharding.BATCH_AXES}
    if n_chunks > 1:
        axes |= {k: 1 for k in arrays["query"]} | {"position_ids": 2}
    return axes


def chunks(host_batch: dict[str, Any]) -> int:
    """GradCache chunks of a host batch (1: unchunked): the leading axis of a chunked query array."""
    ids = host_batch["query"]["input_ids"]
    return ids.shape[0] if ids.ndim == 3 else 1


# ================================================================================================ the data


class BiEncoderData:
    """The pipeline's host batches, with the counts of examples it skipped (checkpointed with the
    iterator: the state is ``{"iterator": <grain state>, "bad_records": {kind: count}}``)."""

    def __init__(self, cfg: TrainerConfig, inputs: build.TrainInputs, **hooks: Any):
        """``hooks``: ``example_fn`` / ``batch_fn`` of :func:`mmret.data.pipeline.mixed_train_dataset` (another
        task's examples over the same stores, e.g. the reranker's pairs)."""
        pipeline = step_pipeline(cfg)
        self.read_bad = inputs.bad  # what the store skipped while reading (counted again every run)
        self.bad = BadRecords(pipeline.on_bad_record)
        if len(inputs.sources) == 1:
            self.examples = len(inputs.store.queries)
        else:  # an epoch of a mix ends when its first source runs out
            sizes = [len(store.queries) for store, _ in inputs.sources]  # every host reads every query
            self.examples = mixed_epoch_length(sizes, [w for _, w in inputs.sources])
        self._iter = iter(mixed_train_dataset(inputs.sources, inputs.processor, pipeline, **hooks))

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iter)
        self.bad.merge([batch["meta"]["bad_records"]])
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"iterator": self._iter.get_state(), "bad_records": dict(self.bad.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iter.set_state(state["iterator"])
        self.bad.counts.update(state["bad_records"])

    def report(self, finished: bool) -> list[str]:
        merged = BadRecords(self.bad.on_bad_record).merge([self.read_bad, self.bad])
        # not "none" just before an error (a bad record's among them) ends the run
        return merged.report() if finished or merged.total else []

    def skipped(self) -> int:
        return self.read_bad.total + self.bad.total


# ================================================================================================ the task


class BiEncoder:
    """The bi-encoder retriever (:class:`~mmret.models.retriever.Retriever`) trained with InfoNCE over the
    global batch (in-batch and mined negatives), optionally with GradCache."""

    name = "bi_encoder"

    def check(self, cfg: TrainerConfig) -> None:
        build.check_model_source(cfg.model)

    def open_inputs(self, cfg: TrainerConfig) -> build.TrainInputs:
        return build.open_inputs(cfg)

    def global_batch_size(self, cfg: TrainerConfig) -> int:
        return cfg.data.pipeline.batch_size * jax.process_count()

    def data(self, cfg: TrainerConfig, inputs: build.TrainInputs) -> BiEncoderData:
        return BiEncoderData(cfg, inputs)

    def model(self, cfg: TrainerConfig, inputs: build.TrainInputs) -> Retriever:
        return checkpoints.initial_model(cfg, max_image_patches=inputs.processor.patcher.max_patches)

    def trainable(self, cfg: TrainerConfig) -> Any:
        return build.trainable_filter(cfg)

    def step(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainerConfig) -> StepFn:
        pipeline = step_pipeline(cfg)
        step_cfg = StepConfig(
            symmetric=cfg.symmetric,
            symmetric_reduction=cfg.symmetric_reduction,
            mask_false_negatives=cfg.mask_false_negatives,
            grad_cache=pipeline.grad_cache_chunk is not None,
        )
        inner = make_train_step(graphdef, tx, step_cfg)

        def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
            mask = batch["positive_mask"]  # [chunks, queries, chunks, candidates]: see global_positive_mask
            return inner(state, {**batch, "positive_mask": mask.reshape(mask.shape[0] * mask.shape[1], -1)})

        return step

    def global_arrays(self, host_batch: dict[str, Any], mesh: jax.sharding.Mesh, rules: Any) -> dict[str, Any]:
        """Chunked batches (GradCache) have their examples on axis 1 (``position_ids``: 2)."""
        n_chunks = chunks(host_batch)
        arrays = {k: v for k, v in host_batch.items() if k != "meta"}
        for side in ("query", "candidates"):
            if packing.is_packed(arrays[side]):  # every process's block takes the most rows any needs
                arrays[side] = packing.globalize(arrays[side])
        meta = host_batch.get("meta", {})
        if jax.process_count() > 1 and "positives" in meta:  # the processes' candidate ids, exchanged
            every = multihost.gather(id_hashes(meta["dids"]))
            arrays["positive_mask"] = exchanged_positive_mask(meta["positives"], every, n_chunks)
        else:
            arrays["positive_mask"] = global_positive_mask(
                arrays["positive_mask"], n_chunks, jax.process_index(), jax.process_count()
            )
        return sharding.put_batch(arrays, mesh, rules, batch_axes(arrays, n_chunks))

    def tokens(self, host_batch: dict[str, Any]) -> int:
        return int(np.sum(host_batch["query"]["attention_mask"])) + int(
            np.sum(host_batch["candidates"]["attention_mask"])
        )
