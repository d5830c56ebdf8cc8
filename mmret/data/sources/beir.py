"""Layout ``beir``: a text-retrieval dataset in the layout MS MARCO and the BEIR datasets share (the public
text-retrieval data of MM-Embed's continual fine-tuning).

The root holds ``corpus.jsonl`` (``{"_id", "title", "text"}``; ``title`` may be absent), ``queries.jsonl``
(``{"_id", "text"}``) and ``qrels/<split>.tsv`` (a header row ``query-id	corpus-id	score``, then one
tab-separated judgement a line; an integer score, > 0 a positive). Other fields are ignored. The queries
of the store are those of ``queries.jsonl`` (in its order) with at least one positive in the split's
qrels, each with its positives in qrels order; ids are ``beir:<_id>`` for queries and documents alike
(two ``beir`` roots mixed in one run share that id space). No instruction: BEIR and MS MARCO have none,
and MM-Embed's per-dataset instructions are not public.

Text: fields stripped of surrounding whitespace; a document's text is its title and text joined by one
space (the title left out when empty), the join BEIR's own dense-retrieval models make
(``title + " " + text``, stripped), so the title's words are searchable as the body's are. No UniIR
``format_string`` (its capitalisation and final period are M-BEIR's convention, not this data's).

A bad record (a line that is not a JSON object, a missing or mistyped field, an empty text, a duplicate
id, a qrels line with the wrong number of columns, a non-integer score, or naming an unknown query or
document; a query or document skipped as bad is unknown to the lines naming it) is a
:class:`~mmret.data.bad_records.BadRecordError` naming ``file:line``, handled by ``bad``. A
qrels file without its header row raises under either policy. The whole corpus is held in memory (the
documents as their joined texts).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from mmret.atomic_dir import PathLike, as_path
from mmret.data.bad_records import (
    BAD_LINE,
    BAD_TYPE,
    DUPLICATE_ID,
    EMPTY_TEXT,
    MISSING_FIELD,
    NOT_UTF8,
    UNKNOWN_DOCUMENT,
    UNKNOWN_QUERY,
    BadRecordError,
    BadRecords,
    location,
)
from mmret.data.example import Example, Part
from mmret.data.mbeir import iter_jsonl
from mmret.data.sources import SourceStore, require_file

LAYOUT = "beir"
CORPUS = "corpus.jsonl"
QUERIES = "queries.jsonl"
QRELS_HEADER = ("query-id", "corpus-id", "score")


def qrels_name(split: str) -> str:
    """``qrels/<split>.tsv``; ``ValueError`` for a split that is not a plain file name."""
    if not split or split.strip() != split or any(c in split for c in "/\\\x00") or split in (".", ".."):
        raise ValueError(f"split={split!r}: not a qrels file name (a beir root has qrels/<split>.tsv)")
    return f"qrels/{split}.tsv"


def _field(obj: Mapping[str, Any], field: str, where: str, *, required: bool = True) -> str:
    if field not in obj:
        if required:
            raise BadRecordError(where, MISSING_FIELD, f"field {field!r} is missing")
        return ""
    value = obj[field]
    if not isinstance(value, str):
        raise BadRecordError(where, BAD_TYPE, f"{field} must be a string, got {type(value).__name__}")
    return value.strip()


def _id(obj: Mapping[str, Any], where: str, seen: Mapping[str, object] | set[str]) -> str:
    value = _field(obj, "_id", where)
    if not value:
        raise BadRecordError(where, MISSING_FIELD, "_id is empty")
    if value in seen:
        raise BadRecordError(where, DUPLICATE_ID, f"_id {value!r} appears twice")
    return value


def document_text(title: str, text: str) -> str:
    """The model text of a document: title and text stripped, joined by one space (no empty title)."""
    return " ".join(p for p in (title.strip(), text.strip()) if p)


def read_corpus(path: PathLike, bad: BadRecords) -> dict[str, str]:
    """``_id -> joined text`` of ``corpus.jsonl`` (:func:`document_text`), in file order."""
    docs: dict[str, str] = {}
    for where, obj in iter_jsonl(path, bad):
        try:
            did = _id(obj, where, docs)
            text = document_text(_field(obj, "title", where, required=False), _field(obj, "text", where))
            if not text:
                raise BadRecordError(where, EMPTY_TEXT, f"document {did!r} has neither title nor text")
        except BadRecordError as e:
            bad.handle(e)
            continue
        docs[did] = text
    return docs


def read_queries(path: PathLike, bad: BadRecords) -> dict[str, tuple[str, str]]:
    """``_id -> (text, where)`` of ``queries.jsonl``, in file order."""
    queries: dict[str, tuple[str, str]] = {}
    for where, obj in iter_jsonl(path, bad):
        try:
            qid = _id(obj, where, queries)
            text = _field(obj, "text", where)
            if not text:
                raise BadRecordError(where, EMPTY_TEXT, f"query {qid!r} has no text")
        except BadRecordError as e:
            bad.handle(e)
            continue
        queries[qid] = (text, where)
    return queries


def _qrels_lines(path: PathLike) -> Iterator[tuple[str, list[str] | UnicodeDecodeError]]:
    with as_path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield location(path, lineno), e
                continue
            if line.strip():
                yield location(path, lineno), [c.strip() for c in line.split("\t")]


def read_qrels(
    path: PathLike, bad: BadRecords, *, queries: Mapping[str, object], docs: Mapping[str, object]
) -> dict[str, tuple[str, ...]]:
    """``query id -> positive document ids`` (score > 0, qrels order, once each) of a qrels file; every
    line must name a known query and document."""
    lines = _qrels_lines(path)
    header = next(lines, None)
    if header is None or isinstance(header[1], UnicodeDecodeError) or tuple(header[1]) != QRELS_HEADER:
        where = location(path, 1) if header is None else header[0]
        raise BadRecordError(where, BAD_LINE, "expected the header row query-id, corpus-id, score (tab-separated)")
    positives: dict[str, list[str]] = {}
    for where, cols in lines:
        try:
            if isinstance(cols, UnicodeDecodeError):
                raise BadRecordError(where, NOT_UTF8, f"byte {cols.start}: {cols.reason}")
            if len(cols) != 3:
                raise BadRecordError(where, BAD_LINE, f"expected 3 tab-separated columns, got {len(cols)}")
            qid, did, score = cols
            try:
                relevance = int(score)
            except ValueError:
                raise BadRecordError(where, BAD_TYPE, f"score {score!r} is not an integer") from None
            if qid not in queries:
                raise BadRecordError(where, UNKNOWN_QUERY, f"query {qid!r} is not in {QUERIES}")
            if did not in docs:
                raise BadRecordError(where, UNKNOWN_DOCUMENT, f"document {did!r} is not in {CORPUS}")
        except BadRecordError as e:
            bad.handle(e)
            continue
        if relevance > 0:
            dids = positives.setdefault(qid, [])
            if did not in dids:
                dids.append(did)
    return {q: tuple(d) for q, d in positives.items()}


def open_root(
    root: PathLike, *, split: str = "train", bad: BadRecords, negatives_file: PathLike | None = None
) -> SourceStore:
    """The queries of ``split`` (those with positives in ``qrels/<split>.tsv``) and the corpus of a BEIR
    root as a :class:`~mmret.data.sources.SourceStore`."""
    qrels_file = qrels_name(split)
    corpus_path = require_file(root, CORPUS, LAYOUT, "the documents (_id, title, text)")
    queries_path = require_file(root, QUERIES, LAYOUT, "the queries (_id, text)")
    qrels_path = require_file(root, qrels_file, LAYOUT, f"the {split} judgements (query-id, corpus-id, score)")
    docs = read_corpus(corpus_path, bad)
    texts = read_queries(queries_path, bad)
    positives = read_qrels(qrels_path, bad, queries=texts, docs=docs)
    candidates: dict[str, Part] = {}
    for did, text in docs.items():
        cid = f"{LAYOUT}:{did}"
        candidates[cid] = Part(cid, text)
    del docs
    examples = [
        Example(
            Part(f"{LAYOUT}:{qid}", text),
            tuple(f"{LAYOUT}:{d}" for d in positives[qid]),
            task=LAYOUT,
            where=where,
        )
        for qid, (text, where) in texts.items()
        if qid in positives
    ]
    return SourceStore(as_path(root), examples, candidates, negatives_file=negatives_file, bad=bad)
