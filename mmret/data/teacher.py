"""Distillation teacher files: per training query, a list of candidates and the teacher's scores of them.

Format (JSON Lines, one query per line, UTF-8)::

    {"qid": "9:12", "task": "mscoco_task0", "dids": ["9:5003", ...], "fused": [1.31, ...], ...}

``dids`` is the list the student scores (the retriever's top k, in its order) and ``fused`` the teacher's
score of each (U-MARVEL: ``cosine + w * P(yes)``); :mod:`mmret.distill.teacher` also writes each one's
``cosine`` and ``p_yes``, which the reader ignores. The distill task reads the file ``distill.teacher_file``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from mmret.atomic_dir import PathLike, as_path, write_atomic


@dataclasses.dataclass(frozen=True)
class TeacherList:
    """One query's list: candidate dids and their fused teacher scores (same order)."""

    task: str
    dids: tuple[str, ...]
    fused: tuple[float, ...]


def write_teacher(path: PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Write ``records`` (each with ``qid``, ``task``, ``dids``, ``fused``), atomically."""
    write_atomic(path, "".join(json.dumps(dict(r)) + "\n" for r in records).encode())


def read_teacher(path: PathLike) -> dict[str, TeacherList]:
    """qid -> :class:`TeacherList` of a teacher file; ``ValueError`` naming the file and line of a bad line."""
    out: dict[str, TeacherList] = {}
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher file (distill.teacher_file; a stage's teacher_from builds one)")
    with path.open("r") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                r = json.loads(line)
                dids, fused = tuple(str(d) for d in r["dids"]), tuple(float(s) for s in r["fused"])
                qid, task = str(r["qid"]), str(r["task"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: not a teacher record (qid, task, dids, fused): {e}") from None
            if not dids or len(dids) != len(fused):
                raise ValueError(f"{where}: query {qid}: {len(dids)} dids and {len(fused)} fused scores")
            if qid in out:
                raise ValueError(f"{where}: query {qid} appears twice")
            out[qid] = TeacherList(task, dids, fused)
    return out
