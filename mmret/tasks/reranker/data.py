"""The reranker's training examples: per query, one positive pair (answer yes) and one negative pair (answer no).

As U-MARVEL's ``datasets_mbeir_rerank_only_pointwise.py``: the positive is drawn from the record's
``pos_cand_list``; the negative from the query's retrieved list minus its positives (the store's negatives
file: a local-pool mining run with ``random_fallback=False`` lists the retriever's top ``top_k`` that are not
positives). The query text is UniIR's, its instruction first (``format_string(instruction + " " + text)``);
texts are cut to ``rerank.max_text_tokens`` (:class:`mmret.data.rerank_pairs.PairRenderer`). A batch of ``B``
queries is ``2 B`` sequences: the positives' pairs, then the negatives' (``labels`` 1, then 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmret import build
from mmret.data.bad_records import BadRecords
from mmret.data.example import Example
from mmret.data.pipeline import EncodeTrainExample, PipelineConfig
from mmret.data.processor import Processor
from mmret.data.rerank_pairs import RerankExample, collate_pairs, query_text
from mmret.data.stores import Store
from mmret.recipe import RerankConfig


@dataclasses.dataclass
class PairsExample:
    """A query's two training pairs."""

    positive: RerankExample
    negative: RerankExample
    qid: str
    dids: tuple[str, str]
    bad: BadRecords


class EncodePairs(EncodeTrainExample):
    """grain random map: (query index, epoch) -> :class:`PairsExample` (bad records skipped and replaced as
    in the bi-encoder's pipeline)."""

    def __init__(self, store: Store, processor: Processor, cfg: PipelineConfig, *, rerank: RerankConfig):
        super().__init__(store, processor, cfg)
        self.renderer = build.pair_renderer(processor, rerank)

    def _encode(self, example: Example, rng: np.random.Generator) -> PairsExample:  # type: ignore[override]
        positives = example.positives
        positive = positives[int(rng.integers(len(positives)))]
        pool = self.negatives_of(example)
        negative = pool[int(rng.integers(len(pool)))]
        query = example.query
        q_image = self._image(query.image, f"{example.where or 'query'} (query {example.id})")
        q_text = query_text(query.instruction, query.text)

        def pair(did: str, answer: bool) -> RerankExample:
            part = self.store.candidate_part(did)
            image = self._image(part.image, f"candidate {did}")
            return self.renderer(q_text, q_image, part.text or "", image, answer=answer)

        return PairsExample(
            pair(positive, True),
            pair(negative, False),
            example.id,
            (positive, negative),
            BadRecords(self.cfg.on_bad_record),
        )


def collate_rerank(
    examples: Sequence[PairsExample], processor: Processor, cfg: PipelineConfig, *, rerank: RerankConfig
) -> dict[str, Any]:
    """The host batch: :func:`mmret.data.rerank_pairs.collate_pairs` of the positives' pairs then the
    negatives', ``labels`` [2B] (1 = the pair's candidate is a positive) and host-only ``meta``."""
    pairs = [ex.positive for ex in examples] + [ex.negative for ex in examples]
    batch = collate_pairs(
        pairs,
        max_length=rerank.max_length,
        max_patches=rerank.max_patches,
        max_targets=rerank.max_targets,
        pad_token_id=processor.pad_token_id,
        patch_dim=processor.patcher.patch_dim,
        packing=rerank.packing,
    )
    batch["labels"] = np.array([1] * len(examples) + [0] * len(examples), np.int32)
    batch["meta"] = {
        "qids": [ex.qid for ex in examples],
        "dids": [d for ex in examples for d in ex.dids],
        "bad_records": BadRecords(cfg.on_bad_record).merge(ex.bad for ex in examples),
    }
    return batch
