"""The M-BEIR format: typed records, validating readers, instructions and the evaluation rules.

Layout of a root (UniIR's release, and ``tools/make_synthetic_mbeir.py``)::

    query/{train,val,test}/mbeir_<dataset>_task<N>_<split>.jsonl
    cand_pool/local/mbeir_<dataset>_task<N>_cand_pool.jsonl     (MSCOCO test: ..._task<N>_test_cand_pool.jsonl)
    cand_pool/global/mbeir_union_<split>_cand_pool.jsonl
    qrels/<split>/mbeir_<dataset>_task<N>_<split>_qrels.txt      (one per dataset-task; lines "qid 0 did 1 task_id")
    query/union_train/mbeir_union_up_train.jsonl                 (training file: 16 tasks, up-sampled, repeated qids)
    query/union_val/mbeir_union_val.jsonl
    instructions/query_instructions.tsv
    mbeir_images/...                                            (image paths in records are relative to the root)

Every line is checked by the pure functions :func:`parse_query` / :func:`parse_candidate` (reusable in
pipeline workers); a bad record raises :class:`~mmret.data.bad_records.BadRecordError` naming
``file:line`` and a reason, which the ``on_bad_record`` policy (:class:`~mmret.data.bad_records.BadRecords`)
turns into a stop or a counted skip. Files are streamed line by line. Record validation never opens an
image; ``image_root=`` asks the readers to also check that each referenced image file exists (safely).
A root may be on any file system :mod:`etils.epath` reads (``gs://bucket/mbeir``, ...): the path
builders return ``epath.Path`` s and the readers open files through them.

These tables and checks hold for M-BEIR records only: the records render into the source-neutral
examples the pipelines read (:mod:`mmret.data.example`) in :mod:`mmret.data.sources.mbeir`, and the
stores that hold them are in :mod:`mmret.data.stores`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from etils import epath

from mmret.atomic_dir import PathLike, as_path
from mmret.data.bad_records import (
    BAD_ID,
    BAD_IMAGE,
    BAD_IMAGE_PATH,
    BAD_LINE,
    BAD_TASK,
    BAD_TYPE,
    DUPLICATE_ID,
    EMPTY_TEXT,
    INVALID_JSON,
    MISSING_FIELD,
    MODALITY_MISMATCH,
    NEGATIVE_NOT_IN_POOL,
    NO_POSITIVES,
    NOT_OBJECT,
    NOT_UTF8,
    POSITIVE_NOT_IN_POOL,
    UNKNOWN_MODALITY,
    BadRecordError,
    BadRecords,
    location,
)
from mmret.data.images import BadImageError, resolve_image_path, unsafe_path_reason

# --------------------------------------------------------------------------------------------- constants

SPLITS = ("train", "val", "test")
MODALITIES = ("text", "image", "image,text")
_HAS_TEXT = {"text": True, "image": False, "image,text": True}
_HAS_IMAGE = {"text": False, "image": True, "image,text": True}

#: Dataset name (as in file names) -> dataset id (the prefix of qids and dids).
DATASET_IDS: dict[str, int] = {
    "visualnews": 0,
    "fashion200k": 1,
    "webqa": 2,
    "edis": 3,
    "nights": 4,
    "oven": 5,
    "infoseek": 6,
    "fashioniq": 7,
    "cirr": 8,
    "mscoco": 9,
}
DATASET_NAMES: dict[int, str] = {v: k for k, v in DATASET_IDS.items()}

#: Task id -> (query modality, candidate modality). Task 5 (image -> image,text) is unused by M-BEIR.
TASK_MODALITIES: dict[int, tuple[str, str]] = {
    0: ("text", "image"),
    1: ("text", "text"),
    2: ("text", "image,text"),
    3: ("image", "text"),
    4: ("image", "image"),
    6: ("image,text", "text"),
    7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}

#: OVEN and InfoSeek: their queries' positives include the other dataset's copy of the entity. UniIR's
#: dataset class keeps only the query's own dataset's positives at evaluation, to pick the positive whose
#: modality keys the instruction; scoring uses every qrels positive (RECIPES.md s.1).
EVAL_RESTRICTED_DATASETS = frozenset({DATASET_IDS["oven"], DATASET_IDS["infoseek"]})

#: Datasets reported at Recall@10 (Fashion200K, FashionIQ); all others at Recall@5.
_RECALL_AT_10 = frozenset({"fashion200k", "fashioniq"})

_json_decode = json.JSONDecoder().decode
_QUERY_FILE = re.compile(r"mbeir_([a-z0-9]+)_task(\d+)_(train|val|test)\.jsonl")


@dataclasses.dataclass(frozen=True)
class DatasetTask:
    """One M-BEIR dataset-task, e.g. ``visualnews_task0`` (VisualNews, text -> image)."""

    dataset: str
    task_id: int

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_IDS:
            raise ValueError(f"unknown M-BEIR dataset {self.dataset!r} (known: {', '.join(DATASET_IDS)})")
        if self.task_id not in TASK_MODALITIES:
            raise ValueError(f"unknown M-BEIR task id {self.task_id} (known: {sorted(TASK_MODALITIES)})")

    @property
    def name(self) -> str:
        return f"{self.dataset}_task{self.task_id}"

    @property
    def dataset_id(self) -> int:
        return DATASET_IDS[self.dataset]

    @property
    def query_modality(self) -> str:
        return TASK_MODALITIES[self.task_id][0]

    @property
    def cand_modality(self) -> str:
        return TASK_MODALITIES[self.task_id][1]

    @property
    def recall_k(self) -> int:
        """The k of the reported Recall@k (10 for Fashion200K and FashionIQ, else 5)."""
        return 10 if self.dataset in _RECALL_AT_10 else 5

    def __str__(self) -> str:
        return self.name


#: The 16 evaluated dataset-tasks, in the order papers report them.
EVAL_TASKS: tuple[DatasetTask, ...] = tuple(
    DatasetTask(d, t)
    for d, t in [
        ("visualnews", 0),
        ("mscoco", 0),
        ("fashion200k", 0),
        ("webqa", 1),
        ("edis", 2),
        ("webqa", 2),
        ("visualnews", 3),
        ("mscoco", 3),
        ("fashion200k", 3),
        ("nights", 4),
        ("oven", 6),
        ("infoseek", 6),
        ("fashioniq", 7),
        ("cirr", 7),
        ("oven", 8),
        ("infoseek", 8),
    ]
)


def eval_tasks() -> tuple[DatasetTask, ...]:
    """The 16 evaluated dataset-tasks (:data:`EVAL_TASKS`)."""
    return EVAL_TASKS


def dataset_task(name: str | DatasetTask) -> DatasetTask:
    """Parse ``"<dataset>_task<N>"`` (e.g. ``"cirr_task7"``) into a :class:`DatasetTask`."""
    if isinstance(name, DatasetTask):
        return name
    m = re.fullmatch(r"([a-z0-9]+)_task(\d+)", name)
    if m is None:
        raise ValueError(f"not a dataset-task name: {name!r} (expected e.g. 'visualnews_task0')")
    return DatasetTask(m.group(1), int(m.group(2)))


# ----------------------------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, slots=True)
class Query:
    """A query line. ``text`` / ``image_path`` are ``None`` when the modality has no text / image."""

    qid: str
    dataset_id: int
    task_id: int
    text: str | None
    image_path: str | None
    modality: str
    pos_cand_list: tuple[str, ...]
    neg_cand_list: tuple[str, ...]
    src_content: str | None = None
    where: str | None = dataclasses.field(default=None, compare=False)  # file:line it was read from
    copy: int = dataclasses.field(default=0, compare=False)  # n-th line of this qid (up-sampled union files)


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A candidate-pool line. ``text`` / ``image_path`` are ``None`` when the modality has no text / image."""

    did: str
    text: str | None
    image_path: str | None
    modality: str
    src_content: str | None = None

    @property
    def dataset_id(self) -> int:
        return int(self.did.split(":", 1)[0])


@dataclasses.dataclass(frozen=True)
class Qrels:
    """Relevance judgements: qid -> positive dids (file order), qid -> task id."""

    positives: dict[str, tuple[str, ...]]
    task_ids: dict[str, int]


# ------------------------------------------------------------------------------------------------- paths


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def query_path(root: PathLike, split: str, task: str | DatasetTask) -> epath.Path:
    """``query/<split>/mbeir_<dataset>_task<N>_<split>.jsonl``."""
    split = _split(split)
    return as_path(root) / "query" / split / f"mbeir_{dataset_task(task).name}_{split}.jsonl"


def local_pool_path(root: PathLike, task: str | DatasetTask, split: str = "test") -> epath.Path:
    """A task's local pool; MSCOCO's test pools are the ``_test_cand_pool`` files."""
    task = dataset_task(task)
    test = "_test" if task.dataset == "mscoco" and _split(split) == "test" else ""
    return as_path(root) / "cand_pool" / "local" / f"mbeir_{task.name}{test}_cand_pool.jsonl"


def global_pool_path(root: PathLike, split: str = "test") -> epath.Path:
    """``cand_pool/global/mbeir_union_<split>_cand_pool.jsonl`` (the union of the local pools)."""
    return as_path(root) / "cand_pool" / "global" / f"mbeir_union_{_split(split)}_cand_pool.jsonl"


def qrels_path(root: PathLike, split: str, task: str | DatasetTask) -> epath.Path:
    """``qrels/<split>/mbeir_<dataset>_task<N>_<split>_qrels.txt``: one file per dataset-task, named after
    its query file (MSCOCO included: no ``_test`` infix as in its pool names)."""
    split = _split(split)
    return as_path(root) / "qrels" / split / f"mbeir_{dataset_task(task).name}_{split}_qrels.txt"


#: The union query files (``data.split`` train / val read them when present; test has none).
UNION_QUERY_FILES: dict[str, dict[str, str]] = {
    "train": {
        "union_up": "query/union_train/mbeir_union_up_train.jsonl",
        "union": "query/union_train/mbeir_union_train.jsonl",
    },
    "val": {"union": "query/union_val/mbeir_union_val.jsonl"},
}


def union_query_path(root: PathLike, split: str, kind: str = "union_up") -> epath.Path:
    """A union query file of ``split`` (:data:`UNION_QUERY_FILES`): ``union_up`` (up-sampled, the file every
    published recipe trains from) or ``union`` (each training query once; val has only this one)."""
    files = UNION_QUERY_FILES.get(_split(split), {})
    if kind not in files:
        raise ValueError(f"no {kind!r} union query file for split {split!r} (have: {', '.join(files) or 'none'})")
    return as_path(root) / files[kind]


def instructions_path(root: PathLike) -> epath.Path:
    return as_path(root) / "instructions" / "query_instructions.tsv"


#: ``data.query_file`` choices (:func:`union_file`; the training stores read by it).
QUERY_FILES = ("auto", "union_up", "union", "per_task")


def union_file(root: PathLike, split: str, query_file: str = "auto") -> epath.Path | None:
    """The union query file ``split`` reads under ``query_file`` (None: the per-task files).

    ``auto``: train reads ``mbeir_union_up_train.jsonl`` and val ``mbeir_union_val.jsonl`` when the root
    has them (the files every published recipe uses); test, and roots without them, read the per-task files.
    """
    if query_file not in QUERY_FILES:
        raise ValueError(f"data.query_file must be one of {', '.join(QUERY_FILES)}, got {query_file!r}")
    if query_file == "per_task":
        return None
    if query_file == "auto":
        kind = {"train": "union_up", "val": "union"}.get(split)
        path = None if kind is None else union_query_path(root, split, kind)
        return path if path is not None and path.is_file() else None
    path = union_query_path(root, split, query_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (data.query_file={query_file!r})")
    return path


def pool_tasks(root: PathLike, split: str, tasks: Sequence[str], pools: Sequence[str]) -> list[str]:
    """The tasks whose local pool an evaluation reads: those evaluated (the file must exist), and with the
    global pool every other one whose file exists (the union pool reuses their embeddings)."""
    out = list(tasks)
    if "global" in pools:
        out += [t.name for t in EVAL_TASKS if t.name not in out and local_pool_path(root, t, split).is_file()]
    return out


def input_files(root: PathLike, split: str, tasks: Sequence[str], pools: Sequence[str]) -> list[epath.Path]:
    """The record files an evaluation of ``tasks`` on ``pools`` reads (what
    :func:`mmret.eval.embed.embed_key` stamps); raises ``FileNotFoundError`` naming a missing one (the root
    itself first)."""
    root = as_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the M-BEIR root (eval.root, else data.root) is not a directory")
    files = [instructions_path(root)] if instructions_path(root).is_file() else []
    for task in tasks:
        files.append(query_path(root, split, task))
        if not files[-1].is_file():
            raise FileNotFoundError(f"{files[-1]}: no {split} queries for {task} under {root}")
    for task in pool_tasks(root, split, tasks, pools):
        files.append(local_pool_path(root, task, split))
        if not files[-1].is_file():
            raise FileNotFoundError(f"{files[-1]}: no local pool for {task} under {root}")
    if "global" in pools:
        files.append(global_pool_path(root, split))
        if not files[-1].is_file():
            raise FileNotFoundError(f"{files[-1]}: no global pool for eval.pools 'global'")
    return files


# ------------------------------------------------------------------------------------------ record checks


def _check_id(value: object, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise BadRecordError(where, BAD_TYPE, f"{field} must be a string, got {type(value).__name__}")
    prefix, sep, n = value.partition(":")
    if not (sep and prefix.isdigit() and n.isdigit() and value.isascii()):
        raise BadRecordError(where, BAD_ID, f"{field} {value!r} is not '<dataset_id>:<n>'")
    return value


def _id_list(obj: Mapping[str, Any], field: str, where: str, *, required: bool) -> tuple[str, ...]:
    if field not in obj:
        if required:
            raise BadRecordError(where, MISSING_FIELD, f"field {field!r} is missing")
        return ()
    value = obj[field]
    if value is None and not required:
        return ()
    if not isinstance(value, list):
        raise BadRecordError(where, BAD_TYPE, f"{field} must be a list of ids, got {type(value).__name__}")
    for item in value:
        _check_id(item, f"{field} entry", where)
    return tuple(value)


def _modality(obj: Mapping[str, Any], field: str, where: str) -> str:
    if field not in obj:
        raise BadRecordError(where, MISSING_FIELD, f"field {field!r} is missing")
    value = obj[field]
    if not isinstance(value, str) or value not in _HAS_TEXT:
        raise BadRecordError(where, UNKNOWN_MODALITY, f"{field} {value!r} is not one of {', '.join(MODALITIES)}")
    return value


def _text(obj: Mapping[str, Any], field: str, modality: str, where: str) -> str | None:
    value = obj.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRecordError(where, BAD_TYPE, f"{field} must be a string or null, got {type(value).__name__}")
    if _HAS_TEXT[modality]:
        if field not in obj:
            raise BadRecordError(where, MISSING_FIELD, f"field {field!r} is missing (modality {modality!r} has text)")
        if value is None:
            raise BadRecordError(where, MODALITY_MISMATCH, f"modality {modality!r} needs text but {field} is null")
        if not value.strip():
            raise BadRecordError(where, EMPTY_TEXT, f"modality {modality!r} needs text but {field} is {value!r}")
        return value
    if value is not None and value.strip():
        raise BadRecordError(where, MODALITY_MISMATCH, f"modality {modality!r} has no text but {field} is set")
    return None


def _image(obj: Mapping[str, Any], field: str, modality: str, where: str) -> str | None:
    value = obj.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRecordError(where, BAD_TYPE, f"{field} must be a string or null, got {type(value).__name__}")
    if _HAS_IMAGE[modality]:
        if field not in obj:
            raise BadRecordError(
                where, MISSING_FIELD, f"field {field!r} is missing (modality {modality!r} has an image)"
            )
        if not value:
            raise BadRecordError(
                where, MODALITY_MISMATCH, f"modality {modality!r} needs an image but {field} is {value!r}"
            )
        reason = unsafe_path_reason(value)
        if reason is not None:
            raise BadRecordError(where, BAD_IMAGE_PATH, f"{field} {value!r}: {reason}")
        return value
    if value:
        raise BadRecordError(where, MODALITY_MISMATCH, f"modality {modality!r} has no image but {field} is {value!r}")
    return None


def _src_content(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)  # some writers store the object itself


def parse_query(
    obj: Mapping[str, Any],
    where: str,
    *,
    task: DatasetTask | None = None,
    keep_src_content: bool = True,
) -> Query:
    """Validate one decoded query line; ``where`` (e.g. ``file:line``) goes into the error.

    Checks: required fields, id syntax, a known modality that agrees with the text / image fields and
    with ``task_id``, non-empty text where the modality has text, a safe relative image path, at least
    one positive. ``task`` (the file's dataset-task) supplies ``task_id`` when the line has none and must
    agree with the line's ``task_id`` and qid prefix otherwise.
    """
    if "qid" not in obj:
        raise BadRecordError(where, MISSING_FIELD, "field 'qid' is missing")
    qid = _check_id(obj["qid"], "qid", where)
    dataset_id = int(qid.split(":", 1)[0])
    modality = _modality(obj, "query_modality", where)
    text = _text(obj, "query_txt", modality, where)
    image_path = _image(obj, "query_img_path", modality, where)

    task_id = obj.get("task_id")
    if task_id is None:
        if task is None:
            raise BadRecordError(where, MISSING_FIELD, "field 'task_id' is missing")
        task_id = task.task_id
    elif type(task_id) is not int:
        raise BadRecordError(where, BAD_TYPE, f"task_id must be an integer, got {task_id!r}")
    if task_id not in TASK_MODALITIES:
        raise BadRecordError(where, BAD_TASK, f"unknown task_id {task_id}")
    if task is not None:
        if task_id != task.task_id:
            raise BadRecordError(where, BAD_TASK, f"task_id {task_id} in a {task.name} file")
        if dataset_id != task.dataset_id:
            raise BadRecordError(where, BAD_ID, f"qid {qid!r} in a {task.name} file (dataset id {task.dataset_id})")
    if TASK_MODALITIES[task_id][0] != modality:
        raise BadRecordError(
            where, MODALITY_MISMATCH, f"task {task_id} queries are {TASK_MODALITIES[task_id][0]!r}, not {modality!r}"
        )

    pos = _id_list(obj, "pos_cand_list", where, required=True)
    if not pos:
        raise BadRecordError(where, NO_POSITIVES, f"query {qid} has an empty pos_cand_list")
    neg = _id_list(obj, "neg_cand_list", where, required=False)
    src = _src_content(obj.get("query_src_content")) if keep_src_content else None
    return Query(qid, dataset_id, task_id, text, image_path, modality, pos, neg, src, where)


def parse_candidate(obj: Mapping[str, Any], where: str, *, keep_src_content: bool = True) -> Candidate:
    """Validate one decoded candidate-pool line (id, modality against the fields, text, image path)."""
    if "did" not in obj:
        raise BadRecordError(where, MISSING_FIELD, "field 'did' is missing")
    did = _check_id(obj["did"], "did", where)
    modality = _modality(obj, "modality", where)
    text = _text(obj, "txt", modality, where)
    image_path = _image(obj, "img_path", modality, where)
    src = _src_content(obj.get("src_content")) if keep_src_content else None
    return Candidate(did, text, image_path, modality, src)


def restrict_positives(qid: str, dids: Iterable[str]) -> tuple[str, ...]:
    """The positives of ``qid`` from its own dataset for OVEN and InfoSeek (all of them otherwise): the
    ones that name the instruction's candidate modality and must be in the task's local pool. Not a
    scoring rule: scoring counts every qrels positive."""
    dids = tuple(dids)
    prefix, _, _ = qid.partition(":")
    if int(prefix) not in EVAL_RESTRICTED_DATASETS:
        return dids
    return tuple(d for d in dids if d.partition(":")[0] == prefix)


def for_eval(query: Query) -> Query:
    """``query`` with its positives restricted as at evaluation (:func:`restrict_positives`)."""
    pos = restrict_positives(query.qid, query.pos_cand_list)
    return query if pos == query.pos_cand_list else dataclasses.replace(query, pos_cand_list=pos)


def check_against_pool(query: Query, pool: Mapping[str, object], where: str) -> None:
    """Raise when a positive or negative of ``query`` is not in ``pool``."""
    for field, reason in (("pos_cand_list", POSITIVE_NOT_IN_POOL), ("neg_cand_list", NEGATIVE_NOT_IN_POOL)):
        ids = getattr(query, field)
        missing = [d for d in ids if d not in pool]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise BadRecordError(
                where, reason, f"query {query.qid}: {field} id {missing[0]!r} is not in the pool{more}"
            )


def check_images(record: Query | Candidate, image_root: PathLike, where: str) -> None:
    """Raise when the record's image path escapes ``image_root`` or names no file (no decoding)."""
    if record.image_path is None:
        return
    try:
        resolve_image_path(image_root, record.image_path)
    except BadImageError as e:
        raise BadRecordError(where, BAD_IMAGE, str(e)) from None


# -------------------------------------------------------------------------------------------- reading


def iter_jsonl(path: PathLike, bad: BadRecords) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each non-blank line of a JSON-lines file; undecodable lines go to ``bad``."""
    with as_path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = location(path, lineno)
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                bad.handle(BadRecordError(where, NOT_UTF8, f"byte {e.start}: {e.reason}"))
                continue
            line = line.rstrip()
            if not line:
                continue
            try:
                obj = _json_decode(line)
            except json.JSONDecodeError as e:
                bad.handle(BadRecordError(where, INVALID_JSON, f"{e.msg.removesuffix(' at')} at column {e.colno}"))
                continue
            if not isinstance(obj, dict):
                bad.handle(BadRecordError(where, NOT_OBJECT, f"a line must be a JSON object, got {type(obj).__name__}"))
                continue
            yield where, obj


def _task_of_file(path: PathLike) -> DatasetTask | None:
    m = _QUERY_FILE.fullmatch(as_path(path).name)
    if m is None or m.group(1) not in DATASET_IDS or int(m.group(2)) not in TASK_MODALITIES:
        return None
    return DatasetTask(m.group(1), int(m.group(2)))


def iter_queries(
    path: PathLike,
    *,
    bad: BadRecords | None = None,
    task: DatasetTask | str | None = None,
    pool: Mapping[str, object] | None = None,
    eval_positives: bool = False,
    keep_src_content: bool = False,
    image_root: PathLike | None = None,
    seen: set[str] | None = None,
    copies: dict[str, Query] | None = None,
) -> Iterator[Query]:
    """Stream the valid queries of one file.

    ``task`` defaults to the one the file name gives (``mbeir_<dataset>_task<N>_<split>.jsonl``), none for
    other names. ``eval_positives`` keeps only the own-dataset positives (:func:`restrict_positives`)
    before the positive checks. With ``pool``, every positive and negative must be in it. ``seen``
    (shared across files) catches duplicate qids; the first occurrence wins. ``copies`` (a union file's
    qid -> first occurrence) instead allows repeats of a qid with the same record, as up-sampling writes
    them: each is yielded with its ``copy`` number (0, 1, ...). ``bad`` defaults to ``BadRecords("error")``.
    """
    bad = BadRecords("error") if bad is None else bad
    task = _task_of_file(path) if task is None else dataset_task(task)
    seen = set() if seen is None else seen
    counts: dict[str, int] = {}
    for where, obj in iter_jsonl(path, bad):
        try:
            query = parse_query(obj, where, task=task, keep_src_content=keep_src_content)
            if eval_positives:
                query = for_eval(query)
                if not query.pos_cand_list:
                    raise BadRecordError(where, NO_POSITIVES, f"query {query.qid} has no positive from its own dataset")
            if copies is not None and query.qid in copies:
                if copies[query.qid] != query:
                    raise BadRecordError(where, DUPLICATE_ID, f"qid {query.qid!r} repeats with another record")
                counts[query.qid] += 1
                yield dataclasses.replace(copies[query.qid], copy=counts[query.qid], where=where)
                continue
            if query.qid in seen:
                raise BadRecordError(where, DUPLICATE_ID, f"qid {query.qid!r} appears twice")
            if pool is not None:
                check_against_pool(query, pool, where)
            if image_root is not None:
                check_images(query, image_root, where)
        except BadRecordError as e:
            bad.handle(e)
            continue
        seen.add(query.qid)
        if copies is not None:
            copies[query.qid], counts[query.qid] = query, 0
        yield query


def read_union_queries(
    path: PathLike,
    tasks: Iterable[str | DatasetTask] | None = None,
    *,
    bad: BadRecords | None = None,
    pool: Mapping[str, object] | None = None,
    keep_src_content: bool = False,
    image_root: PathLike | None = None,
) -> list[Query]:
    """The valid queries of a union file (:func:`union_query_path`), in file order, up-sampled copies of
    a qid included (each its own example, numbered by ``copy``); ``tasks`` keeps only those dataset-tasks
    (by each line's qid prefix and ``task_id``). Options as :func:`iter_queries`."""
    if not as_path(path).is_file():
        raise FileNotFoundError(f"{path}: no such union query file")
    keep = None if tasks is None else {dataset_task(t) for t in tasks}
    out: list[Query] = []
    for query in iter_queries(
        path, bad=bad, pool=pool, keep_src_content=keep_src_content, image_root=image_root, copies={}
    ):
        if keep is None or query_task(query) in keep:
            out.append(query)
    return out


def query_task(query: Query) -> DatasetTask | None:
    """The dataset-task of a query (its qid's dataset and its ``task_id``); None for an unknown dataset id."""
    name = DATASET_NAMES.get(query.dataset_id)
    return None if name is None else DatasetTask(name, query.task_id)


def read_queries(
    root: PathLike,
    split: str,
    tasks: str | DatasetTask | Iterable[str | DatasetTask] | None = None,
    *,
    bad: BadRecords | None = None,
    pool: Mapping[str, object] | None = None,
    eval_positives: bool = False,
    keep_src_content: bool = False,
    image_root: PathLike | None = None,
) -> list[Query]:
    """All valid queries of ``split`` for one task, several, or (``None``) the 16 evaluated ones.

    Qids must be unique across the files read. See :func:`iter_queries` for the options.
    """
    if tasks is None:
        tasks = EVAL_TASKS
    elif isinstance(tasks, str | DatasetTask):
        tasks = [tasks]
    bad = BadRecords("error") if bad is None else bad
    seen: set[str] = set()
    queries: list[Query] = []
    for task in tasks:
        task = dataset_task(task)
        path = query_path(root, split, task)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {split} queries for {task.name} under {root}")
        queries.extend(
            iter_queries(
                path,
                bad=bad,
                task=task,
                pool=pool,
                eval_positives=eval_positives,
                keep_src_content=keep_src_content,
                image_root=image_root,
                seen=seen,
            )
        )
    return queries


def iter_pool(
    path: PathLike,
    *,
    bad: BadRecords | None = None,
    keep_src_content: bool = False,
    image_root: PathLike | None = None,
    seen: set[str] | None = None,
) -> Iterator[Candidate]:
    """Stream the valid candidates of a pool file; ``seen`` (optional) catches duplicate dids."""
    bad = BadRecords("error") if bad is None else bad
    for where, obj in iter_jsonl(path, bad):
        try:
            cand = parse_candidate(obj, where, keep_src_content=keep_src_content)
            if seen is not None:
                if cand.did in seen:
                    raise BadRecordError(where, DUPLICATE_ID, f"did {cand.did!r} appears twice")
                seen.add(cand.did)
            if image_root is not None:
                check_images(cand, image_root, where)
        except BadRecordError as e:
            bad.handle(e)
            continue
        yield cand


def read_pool(
    path: PathLike,
    *,
    bad: BadRecords | None = None,
    keep_src_content: bool = False,
    image_root: PathLike | None = None,
) -> dict[str, Candidate]:
    """A pool file as ``did -> Candidate`` (file order); dids must be unique (the first one wins)."""
    bad = BadRecords("error") if bad is None else bad
    pool: dict[str, Candidate] = {}
    for where, obj in iter_jsonl(path, bad):
        try:
            cand = parse_candidate(obj, where, keep_src_content=keep_src_content)
            if cand.did in pool:
                raise BadRecordError(where, DUPLICATE_ID, f"did {cand.did!r} appears twice")
            if image_root is not None:
                check_images(cand, image_root, where)
        except BadRecordError as e:
            bad.handle(e)
            continue
        pool[cand.did] = cand
    return pool


def read_local_pool(
    root: PathLike, task: str | DatasetTask, split: str = "test", **kwargs: Any
) -> dict[str, Candidate]:
    """A task's local pool (:func:`local_pool_path`) as ``did -> Candidate``; options as :func:`read_pool`."""
    return read_pool(local_pool_path(root, task, split), **kwargs)


def read_global_pool(root: PathLike, split: str = "test", **kwargs: Any) -> dict[str, Candidate]:
    """The union pool (:func:`global_pool_path`) as ``did -> Candidate``; options as :func:`read_pool`."""
    return read_pool(global_pool_path(root, split), **kwargs)


def read_qrels_file(path: PathLike, *, bad: BadRecords | None = None, task_id: int | None = None) -> Qrels:
    """Parse ``qid 0 did relevance task_id`` lines; only relevance > 0 counts as a positive. With
    ``task_id`` (a dataset-task's file), a line of another task is a ``bad_task`` record."""
    bad = BadRecords("error") if bad is None else bad
    positives: dict[str, list[str]] = {}
    task_ids: dict[str, int] = {}
    with as_path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = location(path, lineno)
            try:
                try:
                    fields = raw.decode("utf-8").split()
                except UnicodeDecodeError as e:
                    raise BadRecordError(where, NOT_UTF8, f"byte {e.start}: {e.reason}") from None
                if not fields:
                    continue
                if len(fields) != 5:
                    raise BadRecordError(
                        where, BAD_LINE, f"expected 'qid 0 did relevance task_id', got {len(fields)} fields"
                    )
                qid = _check_id(fields[0], "qid", where)
                did = _check_id(fields[2], "did", where)
                try:
                    relevance, line_task = int(fields[3]), int(fields[4])
                except ValueError:
                    raise BadRecordError(where, BAD_TYPE, "relevance and task_id must be integers") from None
                if line_task not in TASK_MODALITIES:
                    raise BadRecordError(where, BAD_TASK, f"unknown task_id {line_task}")
                if task_id is not None and line_task != task_id:
                    raise BadRecordError(where, BAD_TASK, f"task_id {line_task} in a task {task_id} qrels file")
                if task_ids.setdefault(qid, line_task) != line_task:
                    raise BadRecordError(where, BAD_TASK, f"qid {qid} has task_id {task_ids[qid]} and {line_task}")
            except BadRecordError as e:
                bad.handle(e)
                continue
            if relevance > 0:
                dids = positives.setdefault(qid, [])
                if did not in dids:
                    dids.append(did)
    return Qrels({q: tuple(d) for q, d in positives.items()}, task_ids)


def read_qrels(root: PathLike, split: str, task: str | DatasetTask, *, bad: BadRecords | None = None) -> Qrels:
    """A dataset-task's qrels for ``split`` (:func:`qrels_path`)."""
    path = qrels_path(root, split, task)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {split} qrels for {dataset_task(task).name} under {root}")
    return read_qrels_file(path, bad=bad, task_id=dataset_task(task).task_id)


# ------------------------------------------------------------------------------------------- instructions


class InstructionNotFoundError(LookupError):
    """No instruction for a (dataset id, query modality, candidate modality)."""


@dataclasses.dataclass(frozen=True)
class Instructions:
    """Query instructions keyed by (dataset id, query modality, positive-candidate modality)."""

    table: Mapping[tuple[int, str, str], tuple[str, ...]]

    def lookup(self, dataset_id: int, query_modality: str, cand_modality: str) -> tuple[str, ...]:
        key = (dataset_id, query_modality, cand_modality)
        if key not in self.table:
            raise InstructionNotFoundError(
                f"no instruction for dataset {dataset_id}, query {query_modality!r} -> candidate {cand_modality!r}"
            )
        return self.table[key]

    def for_query(self, query: Query, seed: int, cand_modality: str | None = None, *, epoch: int = 0) -> str:
        """The instruction drawn for ``query`` from ``(seed, qid, query.copy, epoch)`` (unformatted).

        The candidate modality defaults to the one ``query.task_id`` names (that of its positives).
        Training passes the epoch, so each epoch and each up-sampled copy gets its own draw (as UniIR's
        fresh ``random.choice`` per read); evaluation keeps epoch 0: one seeded draw per query.
        """
        cand_modality = TASK_MODALITIES[query.task_id][1] if cand_modality is None else cand_modality
        options = self.lookup(query.dataset_id, query.modality, cand_modality)
        return options[instruction_index(seed, query.qid, len(options), copy=query.copy, epoch=epoch)]


def instruction_index(seed: int, qid: str, n: int, *, copy: int = 0, epoch: int = 0) -> int:
    """A deterministic draw in ``[0, n)`` from ``(seed, qid, copy, epoch)``: the same in every process and
    run (copy 0 at epoch 0 hashes ``(seed, qid)`` alone)."""
    key = f"{seed}\x00{qid}" if copy == epoch == 0 else f"{seed}\x00{qid}\x00{copy}\x00{epoch}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def read_instructions(path: PathLike, *, bad: BadRecords | None = None) -> Instructions:
    """Parse ``query_instructions.tsv`` (a header row; columns: query modality, candidate modality,
    dataset name, dataset id, then instructions; empty ones ignored). Accepts a root or the file."""
    path = as_path(path)
    if path.is_dir():
        path = instructions_path(path)
    bad = BadRecords("error") if bad is None else bad
    table: dict[tuple[int, str, str], tuple[str, ...]] = {}
    with as_path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = location(path, lineno)
            try:
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise BadRecordError(where, NOT_UTF8, f"byte {e.start}: {e.reason}") from None
                if lineno == 1 or not line.strip():
                    continue  # the header
                cols = [c.strip() for c in line.split("\t")]
                if len(cols) < 5:
                    raise BadRecordError(where, BAD_LINE, f"expected at least 5 tab-separated columns, got {len(cols)}")
                qmod, cmod = cols[0], cols[1]
                for m in (qmod, cmod):
                    if m not in _HAS_TEXT:
                        raise BadRecordError(
                            where, UNKNOWN_MODALITY, f"modality {m!r} is not one of {', '.join(MODALITIES)}"
                        )
                if not cols[3].isdigit():
                    raise BadRecordError(where, BAD_TYPE, f"dataset id {cols[3]!r} is not an integer")
                options = tuple(c for c in cols[4:] if c)
                if not options:
                    raise BadRecordError(where, EMPTY_TEXT, "no instruction on the row")
                key = (int(cols[3]), qmod, cmod)
                if key in table:
                    raise BadRecordError(where, DUPLICATE_ID, f"a second row for {key}")
            except BadRecordError as e:
                bad.handle(e)
                continue
            table[key] = options
    return Instructions(table)


# --------------------------------------------------------------------------------------------- formatting

#: Characters that end a sentence for UniIR's ``format_string`` (no period is added after them).
_SENTENCE_END = ".?!"


def format_text(text: str | None) -> str:
    """UniIR's ``format_string`` (``src/data/preprocessing/utils.py``; U-MARVEL copies it), exactly: drop
    ``\\r``, strip whitespace, then strip double quotes, capitalise the first character, add ``"."`` unless
    the last character is one of ``.?!``. ``None`` and blank text give ``""``."""
    s = (text or "").replace("\r", "").strip().strip('"')
    if s:
        s = s[0].upper() + s[1:]
        if s[-1] not in _SENTENCE_END:
            s += "."
    return s


def query_text_parts(query: Query, instructions: Instructions | None, *, seed: int, epoch: int = 0) -> tuple[str, str]:
    """``(instruction, text)`` with ``query_text == instruction + " " + text`` (no space when ``text`` is
    empty): the formatted instruction (``""`` without instructions) and the rest of
    ``format_text(instruction + " " + query text)``, UniIR's query text. The instruction is drawn from
    ``(seed, qid, copy, epoch)`` (:meth:`Instructions.for_query`)."""
    if instructions is None:
        return "", format_text(query.text)
    return format_query(instructions.for_query(query, seed, epoch=epoch), query.text)


def format_query(instruction: str | None, text: str | None) -> tuple[str, str]:
    """``(instruction, text)`` of a query given its raw instruction and text: the formatted instruction and the
    rest of ``format_text(instruction + " " + text)`` (UniIR's query text; no instruction: the formatted text)."""
    if not instruction:
        return "", format_text(text)
    instruction = format_text(instruction)
    full = format_text(f"{instruction} {text or ''}")
    if full == instruction:
        return instruction, ""
    if not full.startswith(instruction + " "):
        raise ValueError(f"instruction {instruction!r} does not stay a prefix of its query text {full!r}")
    return instruction, full[len(instruction) + 1 :]


def query_text(query: Query, instructions: Instructions | None, *, seed: int, epoch: int = 0) -> str:
    """The query's model text: instruction + " " + query text, capitalised, with a final period.

    An image-only query gets the instruction alone; ``instructions=None`` gives the formatted text alone.
    """
    instruction, text = query_text_parts(query, instructions, seed=seed, epoch=epoch)
    return f"{instruction} {text}" if instruction and text else instruction or text


def candidate_text(candidate: Candidate) -> str:
    """The candidate's model text (formatted, no instruction); ``""`` for an image-only candidate."""
    return format_text(candidate.text)
