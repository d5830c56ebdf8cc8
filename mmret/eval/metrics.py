"""The M-BEIR metric: per-query hit@k, per-task Recall@k in percent, the 16-task average; TREC run files.

The definition follows UniIR (``compute_recall_at_k`` in ``src/common/mbeir_retriever.py`` of
TIGER-AI-Lab/UniIR; RECIPES.md s.1): a query scores 1 when the set of its first k retrieved dids meets
the set of its positives, else 0, and a query without positives scores 0 (it stays in the denominator).
Being set based, duplicated dids in a ranking or in the positives never count twice; a duplicate still
takes up its slot in the ranking. Recall@k of a dataset-task is the mean over its queries, reported here
in percent like the papers. Every qrels positive counts (OVEN's and InfoSeek's include the other
dataset's copy of the entity, so on the global pool retrieving either copy is a hit); a query of a task
with no positives is an error in :func:`evaluate_task`, as UniIR asserts.

Modality bias (MM-Embed; RECIPES.md s.4): on the union pool a retriever may return candidates of another
modality than the task's target (a text passage for a text -> image task). :func:`wrong_modality_share`
measures it: the percent of each query's first k retrieved candidates whose modality string is not the
target's, averaged over the queries.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mmret.atomic_dir import (
    PathLike,
    as_path,
    write_atomic,  # noqa: F401 (re-exported: report.py and tests use it from here)
)
from mmret.data.mbeir import MODALITIES, DatasetTask, dataset_task

#: The k of the Recall@k computed for every task (the headline k, 5 or 10, is among them).
KS: tuple[int, ...] = (1, 5, 10)


def _not_a_string(value: object, what: str) -> None:
    if isinstance(value, str | bytes):
        raise TypeError(f"{what} must be a sequence of ids, got the string {value!r}")


def hits_at_k(ranked: Sequence[Sequence[str]], positives: Sequence[Collection[str]], k: int) -> np.ndarray:
    """Per query 1.0 if any of its positives is among its first ``k`` ranked dids, else 0.0 (float64).

    Rankings may be shorter than ``k`` (all of it is looked at); no positives scores 0.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(ranked) != len(positives):
        raise ValueError(f"{len(ranked)} rankings but {len(positives)} positive sets")
    hits = np.zeros(len(ranked), dtype=np.float64)
    for i, (dids, pos) in enumerate(zip(ranked, positives, strict=True)):
        _not_a_string(dids, "a ranking")
        _not_a_string(pos, "a positive set")
        if not pos:
            continue
        pos = pos if isinstance(pos, set | frozenset) else set(pos)
        hits[i] = any(d in pos for d in dids[:k])
    return hits


def recall_at_k(ranked: Sequence[Sequence[str]], positives: Sequence[Collection[str]], k: int) -> float:
    """Recall@k in percent (0-100): the mean of :func:`hits_at_k` over the queries (at least one)."""
    if len(ranked) == 0:
        raise ValueError("Recall@k of no queries is undefined")
    return float(100.0 * hits_at_k(ranked, positives, k).mean())


def wrong_modality_fractions(
    ranked: Sequence[Sequence[str]], target_modality: str, modality_of: Mapping[str, str], k: int
) -> np.ndarray:
    """Per query the fraction (0-1, float64) of its first ``k`` ranked dids whose modality
    (``modality_of[did]``) is not ``target_modality``; exact string match, so ``"image,text"`` is a
    modality of its own. A ranking shorter than ``k`` counts only what it holds (2 of 4 retrieved wrong:
    0.5); an empty ranking gives NaN. Every slot counts, a repeated did included. ``KeyError`` names a did
    with no modality."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if target_modality not in MODALITIES:
        raise ValueError(f"target modality must be one of {MODALITIES}, got {target_modality!r}")
    out = np.full(len(ranked), np.nan, dtype=np.float64)
    for i, dids in enumerate(ranked):
        _not_a_string(dids, "a ranking")
        top = dids[:k]
        if not top:
            continue
        try:
            wrong = sum(modality_of[d] != target_modality for d in top)
        except KeyError as e:
            raise KeyError(f"retrieved candidate {e.args[0]!r} has no known modality") from None
        out[i] = wrong / len(top)
    return out


def wrong_modality_share(
    ranked: Sequence[Sequence[str]], target_modality: str, modality_of: Mapping[str, str], k: int
) -> float:
    """The wrong-modality share at ``k`` in percent (0-100): the mean of :func:`wrong_modality_fractions`
    over the queries that retrieved anything (an empty ranking has no share and is left out). Raises
    ``ValueError`` when no query retrieved anything."""
    fractions = wrong_modality_fractions(ranked, target_modality, modality_of, k)
    retrieved = fractions[~np.isnan(fractions)]
    if retrieved.size == 0:
        raise ValueError("the wrong-modality share of no retrieved candidates is undefined")
    return float(100.0 * retrieved.mean())


@dataclass(frozen=True)
class TaskResult:
    """Recall@k (percent) of one dataset-task, keyed by k (:data:`KS`); ``wrong_modality``: the
    :func:`wrong_modality_share` at the headline k (percent; computed on the global pool, else None)."""

    task: str
    num_queries: int
    recall: dict[int, float]
    wrong_modality: float | None = None

    @property
    def headline_k(self) -> int:
        """The reported k: 10 for Fashion200K and FashionIQ, else 5."""
        return dataset_task(self.task).recall_k

    @property
    def headline(self) -> float:
        """Recall@:attr:`headline_k`, the number papers report for this task."""
        return self.recall[self.headline_k]


def evaluate_task(
    task: DatasetTask | str,
    qids: Sequence[str],
    ranked: Sequence[Sequence[str]],
    positives: Mapping[str, Collection[str]],
) -> TaskResult:
    """Recall@1/5/10 of one dataset-task from each query's ranking (best first) and ``qid -> positives``
    (e.g. :attr:`mmret.data.mbeir.Qrels.positives`; extra qids are ignored).

    Every positive counts (no OVEN/InfoSeek restriction). Raises ``ValueError`` on no queries, a length
    mismatch, a repeated qid, a qid of another dataset or a query without positives, ``KeyError`` on a
    qid missing from ``positives``.
    """
    task = dataset_task(task)
    if len(qids) != len(ranked):
        raise ValueError(f"{task.name}: {len(qids)} qids but {len(ranked)} rankings")
    if len(qids) == 0:
        raise ValueError(f"{task.name}: no queries to evaluate")
    seen: set[str] = set()
    pos_lists: list[frozenset[str]] = []
    for qid in qids:
        if qid in seen:
            raise ValueError(f"{task.name}: query {qid!r} appears twice")
        seen.add(qid)
        if qid.partition(":")[0] != str(task.dataset_id):
            raise ValueError(f"{task.name}: query {qid!r} is not from dataset {task.dataset} (id {task.dataset_id})")
        if qid not in positives:
            raise KeyError(f"{task.name}: query {qid!r} has no entry in the positives (qrels)")
        pos = positives[qid]
        _not_a_string(pos, f"{task.name}: the positives of {qid!r}")
        if not pos:
            raise ValueError(f"{task.name}: query {qid!r} has no positives")
        pos_lists.append(frozenset(pos))
    recall = {k: recall_at_k(ranked, pos_lists, k) for k in KS}
    return TaskResult(task.name, len(qids), recall)


def average(results: Mapping[str, TaskResult]) -> float:
    """The plain mean of the headline numbers.

    Over the 16 tasks this is the published "avg"; over fewer it is the mean of those given only, not
    comparable with the published averages (:mod:`mmret.eval.report` marks such a report incomplete).
    """
    if not results:
        raise ValueError("the average of no task results is undefined")
    return float(np.mean([r.headline for r in results.values()]))


def wrong_modality_average(results: Mapping[str, TaskResult]) -> float | None:
    """The plain mean of the tasks' wrong-modality shares (percent); None when none has one. Raises
    ``ValueError`` when only some have one."""
    values = [r.wrong_modality for r in results.values()]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        missing = next(n for n, r in results.items() if r.wrong_modality is None)
        raise ValueError(f"{missing}: no wrong-modality share while other tasks have one")
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------- files


def _trec_token(value: str, what: str) -> str:
    value = str(value)
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} must be non-empty and without whitespace in a TREC run file")
    return value


def _format_score(score: float | np.floating) -> str:
    """Shortest text that reads back as the same value of the score's own float type."""
    if score == 0 or 1e-4 <= abs(score) < 1e16:
        return np.format_float_positional(score, unique=True, trim="0")
    return np.format_float_scientific(score, unique=True, trim="0")


def write_trec(
    path: PathLike,
    qids: Sequence[str],
    ranked_dids: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    tag: str,
    top: int = 50,
) -> None:
    """Write a TREC run file: ``qid Q0 did rank score tag`` per line, rank 1-based, at most ``top``
    per query, queries in the order given. Scores must not increase along a ranking (trec_eval sorts by
    score, so the file's ranks and its scores must agree); the file is replaced atomically."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if not len(qids) == len(ranked_dids) == len(scores):
        raise ValueError(f"{len(qids)} qids, {len(ranked_dids)} rankings and {len(scores)} score lists")
    tag = _trec_token(tag, "tag")
    lines: list[str] = []
    for qid, dids, row in zip(qids, ranked_dids, scores, strict=True):
        qid = _trec_token(qid, "qid")
        _not_a_string(dids, f"the ranking of {qid!r}")
        if len(dids) != len(row):
            raise ValueError(f"query {qid!r}: {len(dids)} dids but {len(row)} scores")
        prev = math.inf
        for rank, (did, score) in enumerate(zip(dids[:top], row[:top], strict=True), 1):
            if math.isnan(score) or score > prev:
                raise ValueError(f"query {qid!r}: score {score!r} at rank {rank} is NaN or above the one before")
            prev = score
            lines.append(f"{qid} Q0 {_trec_token(did, 'did')} {rank} {_format_score(score)} {tag}\n")
    write_atomic(path, "".join(lines).encode())


def read_trec(path: PathLike) -> dict[str, list[tuple[str, float]]]:
    """Read a TREC run file into ``qid -> [(did, score), ...]`` ordered by the rank column."""
    runs: dict[str, list[tuple[int, str, float]]] = {}
    with as_path(path).open("r") as f:  # epath reads text as UTF-8
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise ValueError(f"{path}:{lineno}: expected 'qid Q0 did rank score tag', got {len(fields)} fields")
            qid, _, did, rank, score, _ = fields
            try:
                runs.setdefault(qid, []).append((int(rank), did, float(score)))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: rank {rank!r} or score {score!r} is not a number") from None
    return {qid: [(did, score) for _, did, score in sorted(rows, key=lambda r: r[0])] for qid, rows in runs.items()}
