"""Layout ``nli``: SimCSE's ``nli_for_simcse.csv``, the text pairs of U-MARVEL's first stage.

The root holds ``nli_for_simcse.csv``: UTF-8 CSV (the :mod:`csv` module's dialect: commas, double-quoted
fields that may hold commas, quotes and newlines), a header row naming the columns ``sent0``, ``sent1`` and
optionally ``hard_neg`` (other columns are ignored), then one row per pair. Row ``r`` (0-based among the
non-blank data rows, as pandas, which U-MARVEL reads the file with, numbers them) renders as the query
``nli:<r>`` (``sent0``), its positive ``nli:<r>:pos`` (``sent1``) and, with a ``hard_neg`` column, its
own negative ``nli:<r>:neg`` (used only when the pipeline draws ``num_negatives`` > 0; U-MARVEL does not
use it). No instruction.

Text: each field with surrounding whitespace stripped, nothing else (U-MARVEL puts the cells into its
template as they are; no UniIR ``format_string``). A bad row (wrong number of fields, an empty field, bytes
that are not UTF-8, a line the csv module rejects) is a :class:`~mmret.data.bad_records.BadRecordError`
naming ``file:line`` (the row's first line), handled by the ``bad`` policy. A file without the ``sent0``
and ``sent1`` header cannot be read at all and raises under either policy.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from mmret.atomic_dir import PathLike, as_path
from mmret.data.bad_records import BAD_LINE, EMPTY_TEXT, MISSING_FIELD, NOT_UTF8, BadRecordError, BadRecords, location
from mmret.data.example import Example, Part
from mmret.data.sources import SourceStore, require_file, train_only

FILE = "nli_for_simcse.csv"
LAYOUT = "nli"
COLUMNS = ("sent0", "sent1", "hard_neg")


def _rows(path: PathLike) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """``(first line, fields)`` of every non-blank row (or the csv module's error for it); undecodable bytes
    stay as lone surrogates, which :func:`_text` reports."""
    with as_path(path).open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text)
        line = 0
        while True:
            start = line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                line = reader.line_num
                yield start, e
                continue
            line = reader.line_num
            if row:
                yield start, row


def _text(value: str, column: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecordError(where, NOT_UTF8, f"{column}: bytes that are not UTF-8 at character {e.start}") from None
    value = value.strip()
    if not value:
        raise BadRecordError(where, EMPTY_TEXT, f"{column} is empty")
    return value


def _header(row: list[str] | csv.Error | None, where: str) -> tuple[dict[str, int], int]:
    """``(column -> index, number of columns)`` of the header row."""
    names = [] if row is None or isinstance(row, csv.Error) else [c.strip() for c in row]
    if any(c not in names for c in COLUMNS[:2]):
        raise BadRecordError(where, MISSING_FIELD, f"the header row must name {', '.join(COLUMNS)}; got {names}")
    return {c: names.index(c) for c in COLUMNS if c in names}, len(names)


def open_root(
    root: PathLike, *, split: str = "train", bad: BadRecords, negatives_file: PathLike | None = None
) -> SourceStore:
    """The pairs of ``root/nli_for_simcse.csv`` as a :class:`~mmret.data.sources.SourceStore`."""
    train_only(LAYOUT, split)
    path = require_file(root, FILE, LAYOUT, "SimCSE's NLI triplets (columns sent0, sent1, hard_neg)")
    rows = _rows(path)
    first = next(rows, None)
    columns, width = _header(None if first is None else first[1], location(path, 1 if first is None else first[0]))
    queries: list[Example] = []
    candidates: dict[str, Part] = {}
    for r, (line, fields) in enumerate(rows):
        where = location(path, line)
        try:
            if isinstance(fields, csv.Error):
                raise BadRecordError(where, BAD_LINE, f"csv: {fields}")
            if len(fields) != width:
                raise BadRecordError(where, BAD_LINE, f"expected {width} fields (as the header), got {len(fields)}")
            texts = {c: _text(fields[i], c, where) for c, i in columns.items()}
        except BadRecordError as e:
            bad.handle(e)
            continue
        qid = f"{LAYOUT}:{r}"
        pos = Part(f"{qid}:pos", texts["sent1"])
        candidates[pos.id] = pos
        negatives: tuple[str, ...] = ()
        if "hard_neg" in texts:
            neg = Part(f"{qid}:neg", texts["hard_neg"])
            candidates[neg.id] = neg
            negatives = (neg.id,)
        queries.append(Example(Part(qid, texts["sent0"]), (pos.id,), negatives, task=LAYOUT, where=where))
    return SourceStore(path.parent, queries, candidates, negatives_file=negatives_file, bad=bad)
