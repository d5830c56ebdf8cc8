"""The reranker task: the backbone with its LM head trained to answer yes for a query's positive and no for a
retrieved negative (U-MARVEL's pointwise reranker, inherited from LamRA).

Its batch contract: ``B`` queries per host become ``2 B`` pair sequences (the positives' pairs, then the
negatives'; :mod:`mmret.tasks.reranker.data`), collated by :func:`mmret.data.rerank_pairs.collate_pairs`
(static shapes from ``rerank.*``); every array is split over the batch mesh axes along its first axis
(``position_ids``: its second), hosts' blocks concatenated. The step is :mod:`mmret.tasks.reranker.step`.

The negatives come from the store's negatives file (``data.negatives_file``, or the one a stage's
``mine_from`` writes): mine them with ``mining.pool=local``, ``mining.negatives=top_k=100`` and
``mining.random_fallback=False`` (the retriever's local top 100 minus the positives, U-MARVEL's lists).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from mmret import build, sharding
from mmret.data import packing
from mmret.data.processor import Processor
from mmret.models.reranker import Reranker
from mmret.recipe import TrainerConfig, step_pipeline
from mmret.tasks.base import StepFn
from mmret.tasks.bi_encoder.task import BiEncoderData
from mmret.tasks.reranker.data import EncodePairs, collate_rerank
from mmret.tasks.reranker.step import make_train_step


class RerankerTask:
    """See the module docstring."""

    name = "reranker"

    def check(self, cfg: TrainerConfig) -> None:
        build.check_model_source(cfg.model)
        if cfg.model.init_from:
            raise ValueError("model.init_from: the reranker starts from its model source (U-MARVEL: the base model)")
        if step_pipeline(cfg).grad_cache_chunk is not None:
            raise ValueError("grad_cache_chunk: the reranker's step has no GradCache (set it to None)")

    def open_inputs(self, cfg: TrainerConfig) -> build.TrainInputs:
        return build.open_inputs(cfg)

    def global_batch_size(self, cfg: TrainerConfig) -> int:
        return cfg.data.pipeline.batch_size * jax.process_count()

    def data(self, cfg: TrainerConfig, inputs: build.TrainInputs) -> BiEncoderData:
        return BiEncoderData(
            cfg,
            inputs,
            example_fn=functools.partial(EncodePairs, rerank=cfg.rerank),
            batch_fn=functools.partial(collate_rerank, rerank=cfg.rerank),
        )

    def model(self, cfg: TrainerConfig, inputs: build.TrainInputs) -> Reranker:
        return build.build_reranker(cfg, max_image_patches=inputs.processor.patcher.max_patches)

    def trainable(self, cfg: TrainerConfig) -> Any:
        return build.trainable_filter(cfg)

    def step(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainerConfig) -> StepFn:
        pairs = build.pair_renderer(Processor(build.processor_dir(cfg), cfg.data.processor), cfg.rerank)
        return make_train_step(graphdef, tx, pairs.yes_id, pairs.no_id)

    def global_arrays(self, host_batch: dict[str, Any], mesh: jax.sharding.Mesh, rules: Any) -> dict[str, Any]:
        arrays = {k: v for k, v in host_batch.items() if k != "meta"}
        if packing.is_packed(arrays):  # every process's block takes the most rows any needs
            arrays = packing.globalize(arrays)
        return sharding.put_batch(arrays, mesh, rules, sharding.BATCH_AXES)

    def tokens(self, host_batch: dict[str, Any]) -> int:
        return int(np.sum(host_batch["attention_mask"]))
