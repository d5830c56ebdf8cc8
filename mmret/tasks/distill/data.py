"""The distillation's training examples: per query its teacher list (:mod:`mmret.distill.teacher`).

A query of the teacher file is embedded with its instruction as in the bi-encoder's training; its candidates
are the list's first ``distill.top_k`` dids in the file's order (a shorter list repeats its last entry,
masked out of the loss), preceded by a positive from ``pos_cand_list`` when the InfoNCE term is on
(``distill.infonce_weight`` > 0). A batch of ``B`` queries has ``B * L`` candidates, grouped per query
(``L = top_k``, or ``1 + top_k`` with the positive first), ``teacher`` [B, top_k] (the fused scores) and
``list_mask`` [B, top_k], besides the bi-encoder's ``positive_mask``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmret.data.bad_records import BadRecords
from mmret.data.example import Example, encode_part
from mmret.data.pipeline import EncodeTrainExample, PipelineConfig, TrainExample, collate_train
from mmret.data.processor import Processor
from mmret.data.stores import Store
from mmret.data.teacher import TeacherList
from mmret.recipe import DistillConfig


@dataclasses.dataclass
class ListExample(TrainExample):
    """A :class:`TrainExample` whose candidates are the query's teacher list."""

    teacher: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    list_mask: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))


class TeacherQueries:
    """A store whose queries are only those with a teacher list (up-sampled copies kept, in the store's order);
    everything else is the wrapped store's."""

    def __init__(self, store: Store, lists: Mapping[str, TeacherList]):
        self._store, self.lists = store, lists
        self.queries = [q for q in store.queries if q.qid in lists]
        if not self.queries:
            raise ValueError("distill.teacher_file: none of its queries is among the training store's queries")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class EncodeList(EncodeTrainExample):
    """grain random map: (query index, epoch) -> :class:`ListExample`."""

    def __init__(
        self,
        store: Store,
        processor: Processor,
        cfg: PipelineConfig,
        *,
        lists: Mapping[str, TeacherList],
        distill: DistillConfig,
    ):
        super().__init__(store, processor, cfg)
        self.lists, self.distill = lists, distill

    def _encode(self, example: Example, rng: np.random.Generator) -> ListExample:  # type: ignore[override]
        entry = self.lists[example.id]
        k = self.distill.top_k
        dids, fused = list(entry.dids[:k]), list(entry.fused[:k])
        mask = [True] * len(dids) + [False] * (k - len(dids))
        dids += [dids[-1]] * (k - len(dids))
        fused += [fused[-1]] * (k - len(fused))
        if self.distill.infonce_weight > 0:
            positives = example.positives
            dids = [positives[int(rng.integers(len(positives)))], *dids]
        query = example.query
        image = self._image(query.image, f"{example.where or 'query'} (query {example.id})")
        return ListExample(
            query=encode_part(query, self.processor, image),
            candidates=[self._candidate(d) for d in dids],
            qid=example.id,
            dids=dids,
            positives=frozenset(example.positives),
            bad=BadRecords(self.cfg.on_bad_record),
            teacher=np.asarray(fused, np.float32),
            list_mask=np.asarray(mask, bool),
        )


def collate_lists(examples: Sequence[ListExample], processor: Processor, cfg: PipelineConfig) -> dict[str, Any]:
    """:func:`mmret.data.pipeline.collate_train` plus ``teacher`` and ``list_mask`` [B, top_k]."""
    batch = collate_train(examples, processor, cfg)
    batch["teacher"] = np.stack([ex.teacher for ex in examples])
    batch["list_mask"] = np.stack([ex.list_mask for ex in examples])
    return batch
