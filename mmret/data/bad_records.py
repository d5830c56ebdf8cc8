"""What to do with a bad input record: stop with a clear error, or skip it and count it.

Every check in the data code raises :class:`BadRecordError`, naming where the record came from
(``file:line``, or any location string the caller gives) and a short reason code; a
:class:`BadRecords` policy then either re-raises it (``"error"``) or counts it by reason and drops
the record (``"skip"``). Counts merge across workers and print as a short report at the end of a run.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Literal, get_args

OnBadRecord = Literal["error", "skip"]

#: Reason codes used by the readers (a report groups skips by these).
INVALID_JSON = "invalid_json"
NOT_UTF8 = "not_utf8"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
BAD_ID = "bad_id"
UNKNOWN_MODALITY = "unknown_modality"
MODALITY_MISMATCH = "modality_mismatch"
EMPTY_TEXT = "empty_text"
BAD_TASK = "bad_task"
NO_POSITIVES = "no_positives"
POSITIVE_NOT_IN_POOL = "positive_not_in_pool"
NEGATIVE_NOT_IN_POOL = "negative_not_in_pool"
DUPLICATE_ID = "duplicate_id"
BAD_IMAGE_PATH = "bad_image_path"
BAD_IMAGE = "bad_image"
BAD_LINE = "bad_line"
UNKNOWN_QUERY = "unknown_query"  # a judgement (qrels line) naming a query the source does not have
UNKNOWN_DOCUMENT = "unknown_document"  # a judgement naming a document the source does not have

#: How many locations a report lists per reason.
EXAMPLES_PER_REASON = 3


class BadRecordError(ValueError):
    """A record that breaks the format: ``where`` (``file:line``), a reason code and a detail."""

    def __init__(self, where: str, reason: str, detail: str = "") -> None:
        self.where = where
        self.reason = reason
        self.detail = detail
        super().__init__(f"{where}: {reason}" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # keep the three fields across process boundaries (grain workers)
        return (type(self), (self.where, self.reason, self.detail))


def location(file: object, line: int) -> str:
    """The ``where`` of a line of a file: ``path:line`` (1-based)."""
    return f"{file}:{line}"


class BadRecords:
    """The ``on_bad_record`` policy plus the skip counters of one run (or one worker)."""

    def __init__(self, on_bad_record: OnBadRecord = "error") -> None:
        if on_bad_record not in get_args(OnBadRecord):
            raise ValueError(f"on_bad_record must be one of {get_args(OnBadRecord)}, got {on_bad_record!r}")
        self.on_bad_record: OnBadRecord = on_bad_record
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}

    def handle(self, err: BadRecordError) -> None:
        """Raise ``err`` under ``"error"``; count it (the caller drops the record) under ``"skip"``."""
        if self.on_bad_record == "error":
            raise err
        self.counts[err.reason] += 1
        examples = self.examples.setdefault(err.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(str(err))

    @property
    def total(self) -> int:
        """Number of records skipped so far."""
        return sum(self.counts.values())

    def merge(self, others: Iterable[BadRecords]) -> BadRecords:
        """Add the counts of ``others`` (e.g. per-worker policies) into this one; returns ``self``."""
        for other in others:
            self.counts.update(other.counts)
            for reason, examples in other.examples.items():
                mine = self.examples.setdefault(reason, [])
                mine.extend(examples[: EXAMPLES_PER_REASON - len(mine)])
        return self

    def report(self) -> list[str]:
        """A short report: one line for the total, one per reason (count and first locations)."""
        if not self.counts:
            return ["bad records: none"]
        lines = [f"bad records skipped: {self.total}"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    e.g. {example}" for example in self.examples.get(reason, []))
        return lines

    def __repr__(self) -> str:
        return f"BadRecords({self.on_bad_record!r}, skipped={dict(self.counts)})"
