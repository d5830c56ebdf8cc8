"""M-BEIR records -> source-neutral examples, with UniIR's text rule and the seeded instruction draw.

A query renders into an :class:`~mmret.data.example.Example` whose query part holds the instruction
drawn from ``(seed, qid, copy, epoch)`` and the rest of UniIR's ``format_string`` text
(:func:`~mmret.data.mbeir.query_text_parts`), its image path, its positives and its own
``neg_cand_list``; a candidate renders into a :class:`~mmret.data.example.Part` with its formatted text
(:func:`~mmret.data.mbeir.candidate_text`) and image path. Empty texts become ``None`` (no text).
:class:`MBeirStore` gives any holder of M-BEIR records (``instructions``, ``candidate(did)``) the
rendering half of the :class:`~mmret.data.stores.Store` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmret.data.example import Example, Part
from mmret.data.mbeir import Candidate, Instructions, Query, candidate_text, query_task, query_text_parts


def query_example(query: Query, instructions: Instructions | None, *, seed: int, epoch: int = 0) -> Example:
    """``query`` as an :class:`Example`: the instruction drawn for ``(seed, qid, copy, epoch)`` and the
    formatted text (none without ``instructions``: the formatted text alone), image, positives, negatives."""
    instruction, text = query_text_parts(query, instructions, seed=seed, epoch=epoch)
    task = query_task(query)
    return Example(
        query=Part(query.qid, text or None, query.image_path, instruction or None),
        positives=query.pos_cand_list,
        negatives=query.neg_cand_list,
        task="" if task is None else task.name,
        where=query.where,
    )


def candidate_part(candidate: Candidate) -> Part:
    """``candidate`` as a :class:`Part`: its formatted text (none for an image-only one) and image path."""
    return Part(candidate.did, candidate_text(candidate) or None, candidate.image_path)


class MBeirStore:
    """The rendering half of the :class:`~mmret.data.stores.Store` protocol for a store of M-BEIR records:
    a subclass provides ``instructions`` and ``candidate(did) -> Candidate`` (plus ``queries``,
    ``negatives`` and ``image``)."""

    instructions: Instructions | None

    def candidate(self, did: str) -> Candidate:
        raise NotImplementedError

    def query_example(self, record: Query, *, seed: int, epoch: int = 0) -> Example:
        """``record`` (one of ``queries``) rendered, its instruction drawn from ``(seed, qid, copy, epoch)``."""
        return query_example(record, self.instructions, seed=seed, epoch=epoch)

    def candidate_part(self, cid: str) -> Part:
        """The candidate ``cid`` rendered (``KeyError`` when the store has none)."""
        return candidate_part(self.candidate(cid))


class _Records(MBeirStore):
    """A :class:`MBeirStore` over any object holding M-BEIR records (see :func:`as_store`)."""

    def __init__(self, records: Any) -> None:
        self._records = records
        self.queries: Sequence[Query] = records.queries
        self.instructions = records.instructions
        self.negatives: Mapping[str, tuple[str, ...]] | None = getattr(records, "negatives", None)

    def candidate(self, did: str) -> Candidate:
        return self._records.candidate(did)

    def image(self, key: str, *, max_pixels: int) -> Any:
        return self._records.image(key, max_pixels=max_pixels)


def as_store(store: Any) -> Any:
    """``store`` when it renders examples itself (a :class:`~mmret.data.stores.Store`), else a Store over it:
    an object with M-BEIR ``queries``, ``instructions``, ``candidate(did) -> Candidate`` and
    ``image(path, max_pixels=...)`` (``negatives`` optional), e.g. a test's namespace. Every store of
    :mod:`mmret.data.stores` subclasses :class:`MBeirStore` and comes back as it is."""
    return store if hasattr(store, "query_example") and hasattr(store, "candidate_part") else _Records(store)
