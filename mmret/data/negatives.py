"""Hard-negative files: which candidates to use as negatives for which training query.

Format (JSON Lines, one query per line, UTF-8)::

    {"qid": "9:12", "neg_cand_list": ["9:5003", "9:871", ...]}

``neg_cand_list`` is ranked, hardest first, and holds candidate dids of the training pool. Extra keys
are allowed and ignored by the reader; mining (:mod:`mmret.mining`) writes, per negative, its ``ranks``
(1-based in the miner's retrieved list, 0 for a random fallback), ``scores`` (null for a random one) and
``kinds``. The training pipeline reads the file when the config names one (``data.negatives_file``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

from mmret.atomic_dir import PathLike, write_atomic
from mmret.data.bad_records import (
    BAD_TYPE,
    DUPLICATE_ID,
    MISSING_FIELD,
    NEGATIVE_NOT_IN_POOL,
    BadRecordError,
    BadRecords,
)
from mmret.data.mbeir import iter_jsonl


def read_negatives(
    path: PathLike, *, pool: Mapping[str, object] | None = None, bad: BadRecords | None = None
) -> dict[str, tuple[str, ...]]:
    """``qid -> ranked negative dids``; with ``pool``, every did must be in it."""
    bad = BadRecords("error") if bad is None else bad
    out: dict[str, tuple[str, ...]] = {}
    for where, obj in iter_jsonl(path, bad):
        try:
            if "qid" not in obj or "neg_cand_list" not in obj:
                raise BadRecordError(where, MISSING_FIELD, "needs 'qid' and 'neg_cand_list'")
            qid, negs = obj["qid"], obj["neg_cand_list"]
            if not isinstance(qid, str) or not isinstance(negs, list) or not all(isinstance(d, str) for d in negs):
                raise BadRecordError(where, BAD_TYPE, "'qid' must be a string, 'neg_cand_list' a list of strings")
            if qid in out:
                raise BadRecordError(where, DUPLICATE_ID, f"qid {qid!r} appears twice")
            if pool is not None:
                missing = [d for d in negs if d not in pool]
                if missing:
                    raise BadRecordError(where, NEGATIVE_NOT_IN_POOL, f"{missing[0]!r} is not in the pool")
        except BadRecordError as e:
            bad.handle(e)
            continue
        out[qid] = tuple(negs)
    return out


def write_negatives(
    path: PathLike,
    negatives: Iterable[tuple[str, Iterable[str]] | tuple[str, Iterable[str], Mapping[str, Any]]],
) -> None:
    """Write ``(qid, ranked dids)`` pairs, or ``(qid, ranked dids, extra keys)`` triples, in the format above;
    atomically (the file appears whole or not at all). ``negatives`` is read once, as it is written."""

    def write(f: BinaryIO) -> None:
        for item in negatives:
            qid, dids, extra = item if len(item) == 3 else (*item, {})
            clash = {"qid", "neg_cand_list"} & set(extra)
            if clash:
                raise ValueError(f"qid {qid}: extra key {sorted(clash)[0]!r} would replace a field of the format")
            line = {"qid": qid, "neg_cand_list": list(dids), **extra}
            f.write((json.dumps(line) + "\n").encode())

    write_atomic(path, write)
