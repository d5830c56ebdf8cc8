"""Layout ``caption``: LLaVA's CC3M-595K pairs, the caption -> image pairs of U-MARVEL's second stage.

The root holds ``chat.json``, a JSON list (UTF-8) of records ::

    {"id": "GCC_train_000000001", "image": "GCC_train_000000001.jpg",
     "conversations": [{"from": "human", "value": "...<image>"}, {"from": "gpt", "value": "<caption>"}]}

and the images at ``images/<image>``. A record renders as the query ``caption:<id>`` (the caption, the
first ``gpt`` turn's value) whose positive is the image alone, no text: the candidate
``caption:image:<image>`` (keyed by the image, so records sharing an image share their candidate and are
each other's in-batch positive). No instruction.

Text: UniIR's ``format_string`` (:func:`mmret.data.mbeir.format_text`: strip, strip double quotes,
capitalise, final period) applied twice, as U-MARVEL's CC3M dataset does (once to the caption, once more
to its empty instruction + " " + the result); the second pass changes only a caption whose quotes hid
whitespace (``'" a dog"'``: ``' a dog.'`` after one pass, ``'A dog.'`` after two). Images are read only
through :func:`mmret.data.images.load_image` (inside the root, decode cap).

A bad record (not an object, a missing or mistyped field, an empty caption, a duplicate id, an image path
that is absolute or has a ``..`` part) is a :class:`~mmret.data.bad_records.BadRecordError` naming
``file:line`` (the line where the record starts, and its index in the list), handled by ``bad``. A file
that is not a JSON list, or not UTF-8, cannot be read in part: it raises under either policy. Image files
are not opened here: a missing or broken one is a bad record when training reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from mmret.atomic_dir import PathLike, as_path
from mmret.data.bad_records import (
    BAD_IMAGE_PATH,
    BAD_TYPE,
    DUPLICATE_ID,
    EMPTY_TEXT,
    INVALID_JSON,
    MISSING_FIELD,
    NOT_OBJECT,
    NOT_UTF8,
    BadRecordError,
    BadRecords,
    location,
)
from mmret.data.example import Example, Part
from mmret.data.images import unsafe_path_reason
from mmret.data.mbeir import format_text
from mmret.data.sources import SourceStore, require_file, train_only

FILE = "chat.json"
IMAGES = "images"
LAYOUT = "caption"

_WHITESPACE = " \t\n\r"


def _decode(path: PathLike) -> str:
    data = as_path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadRecordError(location(path, line), NOT_UTF8, f"byte {e.start}: {e.reason}") from None


def iter_json_list(path: PathLike) -> Iterator[tuple[str, Any]]:
    """``(where, element)`` for each element of the JSON list in ``path``; ``where`` is ``file:line [i]``
    (the line the element starts on, its index). Malformed JSON raises :class:`BadRecordError`."""
    text = _decode(path)
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i] in _WHITESPACE:
            i += 1
        return i

    def fail(i: int, what: str) -> BadRecordError:
        return BadRecordError(location(path, text.count("\n", 0, i) + 1), INVALID_JSON, what)

    def close(i: int) -> None:
        if skip(i + 1) != len(text):
            raise fail(skip(i + 1), "text after the end of the list")

    i = skip(0)
    if not text.startswith("[", i):
        raise fail(i, "the file must be a JSON list of records")
    i, index = skip(i + 1), 0
    if text.startswith("]", i):
        return close(i)
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fail(e.pos, f"{e.msg} at column {e.colno}") from None
        line += text.count("\n", counted, i)
        counted = i
        yield f"{location(path, line)} [{index}]", obj
        i, index = skip(end), index + 1
        if text.startswith("]", i):
            return close(i)
        if not text.startswith(",", i):
            raise fail(i, "expected ',' or ']' after a record")
        i = skip(i + 1)


def _string(obj: dict[str, Any], field: str, where: str) -> str:
    if field not in obj:
        raise BadRecordError(where, MISSING_FIELD, f"field {field!r} is missing")
    value = obj[field]
    if not isinstance(value, str):
        raise BadRecordError(where, BAD_TYPE, f"{field} must be a string, got {type(value).__name__}")
    return value


def _caption(obj: dict[str, Any], where: str) -> str:
    turns = obj.get("conversations")
    if turns is None:
        raise BadRecordError(where, MISSING_FIELD, "field 'conversations' is missing")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadRecordError(where, BAD_TYPE, "conversations must be a list of objects")
    answers = [t for t in turns if t.get("from") == "gpt"]
    if not answers:
        raise BadRecordError(where, MISSING_FIELD, "no conversations turn from 'gpt' (the caption)")
    value = answers[0].get("value")
    if not isinstance(value, str):
        raise BadRecordError(where, BAD_TYPE, f"the gpt turn's value must be a string, got {type(value).__name__}")
    text = format_text(format_text(value))
    if not text:
        raise BadRecordError(where, EMPTY_TEXT, f"the caption is {value!r}")
    return text


def open_root(
    root: PathLike, *, split: str = "train", bad: BadRecords, negatives_file: PathLike | None = None
) -> SourceStore:
    """The caption -> image pairs of ``root/chat.json`` as a :class:`~mmret.data.sources.SourceStore`."""
    train_only(LAYOUT, split)
    path = require_file(root, FILE, LAYOUT, "LLaVA's CC3M-595K records (a JSON list; images under images/)")
    queries: list[Example] = []
    candidates: dict[str, Part] = {}
    seen: set[str] = set()
    for where, obj in iter_json_list(path):
        try:
            if not isinstance(obj, dict):
                raise BadRecordError(where, NOT_OBJECT, f"a record must be a JSON object, got {type(obj).__name__}")
            rid = _string(obj, "id", where)
            if not rid.strip():
                raise BadRecordError(where, MISSING_FIELD, "id is empty")
            if rid in seen:
                raise BadRecordError(where, DUPLICATE_ID, f"id {rid!r} appears twice")
            image = _string(obj, "image", where)
            reason = unsafe_path_reason(image)
            if reason is not None:
                raise BadRecordError(where, BAD_IMAGE_PATH, f"image {image!r}: {reason}")
            text = _caption(obj, where)
        except BadRecordError as e:
            bad.handle(e)
            continue
        seen.add(rid)
        cid = f"{LAYOUT}:image:{image}"
        candidates.setdefault(cid, Part(cid, None, f"{IMAGES}/{image}"))
        queries.append(Example(Part(f"{LAYOUT}:{rid}", text), (cid,), task=LAYOUT, where=where))
    return SourceStore(path.parent, queries, candidates, negatives_file=negatives_file, bad=bad)
