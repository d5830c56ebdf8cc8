"""The distill task: the retriever learns the reranker teacher's distribution over each query's list
(U-MARVEL's stage 5, :class:`mmret.recipe.DistillConfig`).

Its batch contract is the bi-encoder's (:mod:`mmret.tasks.bi_encoder.task`: ``query``, ``candidates`` grouped
per query, ``positive_mask``) plus ``teacher`` and ``list_mask`` [B, top_k], split over the batch mesh axes
along axis 0 (:mod:`mmret.tasks.distill.data`). The training store keeps only the teacher file's queries
(``distill.teacher_file``; a stage's ``teacher_from`` builds it, :mod:`mmret.distill.teacher`), up-sampled
copies included. No GradCache; no data mix.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax
from flax import nnx

from mmret import build
from mmret.data.teacher import read_teacher
from mmret.recipe import TrainerConfig, step_pipeline
from mmret.tasks.base import StepFn, TrainState
from mmret.tasks.bi_encoder.task import BiEncoder, BiEncoderData
from mmret.tasks.distill.data import EncodeList, TeacherQueries, collate_lists
from mmret.tasks.distill.step import DistillStepConfig, make_train_step


class DistillTask(BiEncoder):
    """See the module docstring; the model, trainable parameters and batch layout are the bi-encoder's."""

    name = "distill"

    def check(self, cfg: TrainerConfig) -> None:
        super().check(cfg)
        if not cfg.distill.teacher_file:
            raise ValueError("distill.teacher_file: give the teacher lists (a stage's teacher_from builds them)")
        if step_pipeline(cfg).grad_cache_chunk is not None:
            raise ValueError("grad_cache_chunk: the distill step has no GradCache (set it to None)")
        if cfg.data.mix:
            raise ValueError("data.mix: the distill task trains on the teacher file's queries alone (no mix)")

    def open_inputs(self, cfg: TrainerConfig) -> build.TrainInputs:
        inputs = build.open_inputs(cfg)
        store = TeacherQueries(inputs.store, read_teacher(cfg.distill.teacher_file))
        return build.TrainInputs(inputs.processor, store, inputs.bad)

    def data(self, cfg: TrainerConfig, inputs: build.TrainInputs) -> BiEncoderData:
        return BiEncoderData(
            cfg,
            inputs,
            example_fn=functools.partial(EncodeList, lists=inputs.store.lists, distill=cfg.distill),
            batch_fn=collate_lists,
        )

    def step(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainerConfig) -> StepFn:
        inner = make_train_step(
            graphdef,
            tx,
            DistillStepConfig(
                teacher_scale=cfg.distill.teacher_scale,
                log_eps=cfg.distill.log_eps,
                infonce_weight=cfg.distill.infonce_weight,
                mask_false_negatives=cfg.mask_false_negatives,
            ),
        )

        def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
            mask = batch["positive_mask"]  # [chunks, queries, chunks, candidates]: see global_positive_mask
            return inner(state, {**batch, "positive_mask": mask.reshape(mask.shape[0] * mask.shape[1], -1)})

        return step
