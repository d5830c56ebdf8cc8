"""The M-BEIR reader: layout, typed records, validation under both bad-record policies, qrels,
instructions (lookup, seeded draw, formatting) and the OVEN/InfoSeek evaluation restriction."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from helpers import uniir_format_string  # noqa: E402
from PIL import Image

from mmret.data import bad_records as br
from mmret.data import mbeir
from mmret.data.bad_records import BadRecordError, BadRecords
from mmret.data.mbeir import Candidate, DatasetTask, Query

# ----------------------------------------------------------------------------------------------- helpers


def q(qid: str = "9:1", **kw: Any) -> dict[str, Any]:
    """A valid mscoco_task0 (text -> image) query line; keywords override or (value ...) drop fields."""
    rec: dict[str, Any] = {
        "qid": qid,
        "query_txt": "a red circle on a grey background",
        "query_img_path": None,
        "query_modality": "text",
        "query_src_content": None,
        "pos_cand_list": ["9:101"],
        "neg_cand_list": [],
        "task_id": 0,
    }
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not ...}


def c(did: str = "9:101", **kw: Any) -> dict[str, Any]:
    """A valid image candidate line."""
    rec: dict[str, Any] = {
        "txt": None,
        "img_path": f"mbeir_images/mscoco_images/{str(did).replace(':', '_')}.jpg",
        "modality": "image",
        "did": did,
        "src_content": None,
    }
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not ...}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Write records (dicts as JSON, bytes and str as they are) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line).encode() + b"\n")
    return path


INSTRUCTIONS_TSV = (
    "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4\n"
    "text\timage\tMSCOCO\t9\tfind me an everyday image that matches the given caption\t"
    "Identify the image showcasing the described everyday scene.\t"
    "Retrieve an image that matches the caption!\tshow me an image that matches the caption?\n"
    "image\ttext\tMSCOCO\t9\tFind an image caption describing the following everyday image.\t\t\t\n"
    "image,text\ttext\tOVEN\t5\tRetrieve a Wikipedia paragraph that provides an answer to the given query about "
    "the image\t\t\t\n"
)


@pytest.fixture
def instructions(tmp_path: Path) -> mbeir.Instructions:
    path = tmp_path / "root" / "instructions" / "query_instructions.tsv"
    path.parent.mkdir(parents=True)
    path.write_text(INSTRUCTIONS_TSV)
    return mbeir.read_instructions(tmp_path / "root")


# ------------------------------------------------------------------------------------- tasks and layout


def test_the_16_dataset_tasks() -> None:
    tasks = mbeir.eval_tasks()
    assert len(tasks) == 16 == len({t.name for t in tasks})
    assert [t.name for t in tasks[:4]] == ["visualnews_task0", "mscoco_task0", "fashion200k_task0", "webqa_task1"]
    assert tasks[-1].name == "infoseek_task8"
    assert sorted({t.dataset_id for t in tasks}) == list(range(10))
    assert [t.name for t in tasks if t.recall_k == 10] == ["fashion200k_task0", "fashion200k_task3", "fashioniq_task7"]
    cirr = mbeir.dataset_task("cirr_task7")
    assert (cirr.dataset_id, cirr.query_modality, cirr.cand_modality) == (8, "image,text", "image")
    assert mbeir.DATASET_IDS["oven"] == 5 and mbeir.DATASET_IDS["infoseek"] == 6
    with pytest.raises(ValueError, match="unknown M-BEIR dataset"):
        mbeir.dataset_task("imagenet_task0")
    with pytest.raises(ValueError, match="unknown M-BEIR task id 5"):
        DatasetTask("nights", 5)


def test_paths(tmp_path: Path) -> None:
    r = tmp_path
    assert mbeir.query_path(r, "val", "nights_task4") == r / "query/val/mbeir_nights_task4_val.jsonl"
    assert mbeir.local_pool_path(r, "mscoco_task3") == r / "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl"
    assert mbeir.local_pool_path(r, "mscoco_task3", "val") == r / "cand_pool/local/mbeir_mscoco_task3_cand_pool.jsonl"
    assert mbeir.local_pool_path(r, "cirr_task7") == r / "cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl"
    assert mbeir.global_pool_path(r) == r / "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
    # One qrels file per dataset-task, named after its query file (UniIR's release), MSCOCO included.
    assert mbeir.qrels_path(r, "test", "webqa_task2") == r / "qrels/test/mbeir_webqa_task2_test_qrels.txt"
    cirr = mbeir.dataset_task("cirr_task7")
    assert mbeir.qrels_path(r, "test", cirr) == r / "qrels/test/mbeir_cirr_task7_test_qrels.txt"
    assert mbeir.qrels_path(r, "test", "mscoco_task0") == r / "qrels/test/mbeir_mscoco_task0_test_qrels.txt"
    assert mbeir.qrels_path(r, "train", "oven_task8") == r / "qrels/train/mbeir_oven_task8_train_qrels.txt"
    with pytest.raises(ValueError):
        mbeir.qrels_path(r, "test", "webqa")  # a dataset alone no longer names a qrels file
    assert mbeir.union_query_path(r, "train") == r / "query/union_train/mbeir_union_up_train.jsonl"
    assert mbeir.union_query_path(r, "train", "union") == r / "query/union_train/mbeir_union_train.jsonl"
    assert mbeir.union_query_path(r, "val", "union") == r / "query/union_val/mbeir_union_val.jsonl"
    with pytest.raises(ValueError, match="no 'union_up' union query file for split 'val'"):
        mbeir.union_query_path(r, "val")
    assert mbeir.instructions_path(r) == r / "instructions/query_instructions.tsv"
    with pytest.raises(ValueError, match="split must be one of"):
        mbeir.query_path(r, "dev", "nights_task4")


# ---------------------------------------------------------------------------------------- valid records


def test_reads_typed_records(tmp_path: Path) -> None:
    root = tmp_path
    write_jsonl(
        mbeir.query_path(root, "test", "mscoco_task0"),
        [q("9:1"), q("9:2", query_txt="two dogs", pos_cand_list=["9:101", "9:102"], query_src_content={"k": 1})],
    )
    write_jsonl(
        mbeir.query_path(root, "test", "cirr_task7"),
        [
            q(
                "8:5",
                query_txt="is blue instead",
                query_img_path="mbeir_images/cirr_images/q.png",
                query_modality="image,text",
                pos_cand_list=["8:7"],
                neg_cand_list=["8:8"],
                task_id=7,
            )
        ],
    )
    queries = mbeir.read_queries(root, "test", ["mscoco_task0", "cirr_task7"])
    assert [x.qid for x in queries] == ["9:1", "9:2", "8:5"]
    assert queries[0] == Query("9:1", 9, 0, "a red circle on a grey background", None, "text", ("9:101",), (), None)
    assert queries[2] == Query(
        "8:5", 8, 7, "is blue instead", "mbeir_images/cirr_images/q.png", "image,text", ("8:7",), ("8:8",), None
    )
    kept = mbeir.read_queries(root, "test", "mscoco_task0", keep_src_content=True)
    assert kept[1].src_content == '{"k": 1}'  # an object is kept as its JSON string
    with pytest.raises(FileNotFoundError, match="mbeir_nights_task4_test.jsonl"):
        mbeir.read_queries(root, "test", "nights_task4")

    write_jsonl(
        mbeir.local_pool_path(root, "mscoco_task0"),
        [
            c("9:101"),
            c("9:102", txt="a caption", img_path=None, modality="text", src_content='{"a": 1}'),
            c("9:103", txt="both", modality="image,text"),
        ],
    )
    pool = mbeir.read_local_pool(root, "mscoco_task0")
    assert list(pool) == ["9:101", "9:102", "9:103"]
    assert pool["9:101"] == Candidate("9:101", None, "mbeir_images/mscoco_images/9_101.jpg", "image", None)
    assert pool["9:102"] == Candidate("9:102", "a caption", None, "text", None)
    assert mbeir.read_local_pool(root, "mscoco_task0", keep_src_content=True)["9:102"].src_content == '{"a": 1}'
    assert pool["9:103"].dataset_id == 9
    write_jsonl(mbeir.global_pool_path(root), [c("9:101"), c("8:7")])
    assert list(mbeir.read_global_pool(root)) == ["9:101", "8:7"]
    assert [x.did for x in mbeir.iter_pool(mbeir.global_pool_path(root))] == ["9:101", "8:7"]


def test_all_16_tasks_of_a_split(tmp_path: Path) -> None:
    for i, task in enumerate(mbeir.EVAL_TASKS):
        qmod = task.query_modality
        rec = q(
            f"{task.dataset_id}:{i}",
            query_txt="some text" if "text" in qmod else None,
            query_img_path=f"mbeir_images/{i}.jpg" if "image" in qmod else None,
            query_modality=qmod,
            pos_cand_list=[f"{task.dataset_id}:{1000 + i}"],
            task_id=task.task_id,
        )
        write_jsonl(mbeir.query_path(tmp_path, "test", task), [rec])
    queries = mbeir.read_queries(tmp_path, "test")
    assert len(queries) == 16
    assert [(x.dataset_id, x.task_id) for x in queries] == [(t.dataset_id, t.task_id) for t in mbeir.EVAL_TASKS]


def test_task_comes_from_the_file_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "query/test/mbeir_mscoco_task0_test.jsonl", [q("9:1", task_id=...)])
    assert next(mbeir.iter_queries(path)).task_id == 0
    other = write_jsonl(tmp_path / "mine.jsonl", [q("9:1", task_id=...)])
    with pytest.raises(BadRecordError, match=r"mine.jsonl:1: missing_field: field 'task_id' is missing"):
        list(mbeir.iter_queries(other))
    assert next(mbeir.iter_queries(other, task="mscoco_task0")).task_id == 0


def test_blank_lines_and_bom_are_fine(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pool.jsonl", [b"\xef\xbb\xbf" + json.dumps(c("9:1")).encode(), "", "  ", c("9:2")])
    assert list(mbeir.read_pool(path)) == ["9:1", "9:2"]


# ---------------------------------------------------------------------------------------- bad records

QUERY_CASES: dict[str, tuple[Any, str]] = {
    "missing qid": (q(qid=...), br.MISSING_FIELD),
    "missing modality": (q(query_modality=...), br.MISSING_FIELD),
    "missing positives": (q(pos_cand_list=...), br.MISSING_FIELD),
    "missing text of a text query": (q(query_txt=...), br.MISSING_FIELD),
    "null text of a text query": (q(query_txt=None), br.MODALITY_MISMATCH),
    "unknown modality": (q(query_modality="video"), br.UNKNOWN_MODALITY),
    "modality not a string": (q(query_modality=["text"]), br.UNKNOWN_MODALITY),
    "image query without image": (q(query_modality="image", query_txt=None, task_id=3), br.MODALITY_MISMATCH),
    "text query with image, no text": (q(query_txt=None, query_img_path="mbeir_images/x.jpg"), br.MODALITY_MISMATCH),
    "text query with an image": (q(query_img_path="mbeir_images/x.jpg"), br.MODALITY_MISMATCH),
    "image query with text": (
        q(query_modality="image", query_img_path="mbeir_images/x.jpg", task_id=3),
        br.MODALITY_MISMATCH,
    ),
    "modality against task": (
        q(query_modality="image", query_txt=None, query_img_path="mbeir_images/x.jpg"),
        br.MODALITY_MISMATCH,
    ),
    "no positives": (q(pos_cand_list=[]), br.NO_POSITIVES),
    "empty text": (q(query_txt=""), br.EMPTY_TEXT),
    "blank text": (q(query_txt=" \t "), br.EMPTY_TEXT),
    "invalid json": ('{"qid": "9:7", "query_txt": ', br.INVALID_JSON),
    "not utf-8": (b'{"qid": "9:7", "query_txt": "caf\xe9"}', br.NOT_UTF8),
    "not an object": ("[1, 2]", br.NOT_OBJECT),
    "bad qid": (q("nine"), br.BAD_ID),
    "qid of another dataset": (q("8:7"), br.BAD_ID),
    "bad positive id": (q(pos_cand_list=["9:1", 101]), br.BAD_TYPE),
    "positives not a list": (q(pos_cand_list="9:101"), br.BAD_TYPE),
    "text not a string": (q(query_txt=42), br.BAD_TYPE),
    "task of another file": (q(task_id=3), br.BAD_TASK),
    "unknown task": (q(task_id=5), br.BAD_TASK),
    "task id not an int": (q(task_id="0"), br.BAD_TYPE),
    "absolute image path": (
        q(query_modality="image,text", query_img_path="/etc/x.jpg", task_id=...),
        br.BAD_IMAGE_PATH,
    ),
    "escaping image path": (q(query_modality="image,text", query_img_path="../x.jpg", task_id=...), br.BAD_IMAGE_PATH),
    "duplicate qid": (q("9:1", query_txt="again"), br.DUPLICATE_ID),
}


def _query_file(tmp_path: Path, bad_line: Any, task: str = "mscoco_task0") -> Path:
    """Lines 1, 2, 4 valid (qids 9:1 9:2 9:4), line 3 the bad one."""
    path = mbeir.query_path(tmp_path, "test", task)
    return write_jsonl(path, [q("9:1"), q("9:2"), bad_line, q("9:4")])


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_bad_query_stops_under_error(tmp_path: Path, case: str) -> None:
    bad_line, reason = QUERY_CASES[case]
    task, line = "mscoco_task0", 3
    if case.endswith("image path"):  # these need a file of image,text queries
        task, line = "cirr_task7", 1
        write_jsonl(mbeir.query_path(tmp_path, "test", task), [{**bad_line, "qid": "8:3", "pos_cand_list": ["8:1"]}])
    else:
        _query_file(tmp_path, bad_line)
    path = mbeir.query_path(tmp_path, "test", task)
    with pytest.raises(BadRecordError) as e:
        mbeir.read_queries(tmp_path, "test", task)
    assert str(e.value).startswith(f"{path}:{line}: {reason}: ")
    assert (e.value.where, e.value.reason) == (f"{path}:{line}", reason)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("case", [k for k in QUERY_CASES if not k.endswith("image path")])
def test_bad_query_counted_under_skip(tmp_path: Path, case: str) -> None:
    bad_line, reason = QUERY_CASES[case]
    _query_file(tmp_path, bad_line)
    bad = BadRecords("skip")
    queries = mbeir.read_queries(tmp_path, "test", "mscoco_task0", bad=bad)
    assert [x.qid for x in queries] == ["9:1", "9:2", "9:4"]
    assert dict(bad.counts) == {reason: 1} and bad.total == 1
    report = bad.report()
    assert report[0] == "bad records skipped: 1" and report[1] == f"  {reason}: 1"
    assert ":3: " in report[2]


CAND_CASES: dict[str, tuple[Any, str]] = {
    "missing did": (c(did=...), br.MISSING_FIELD),
    "missing modality": (c(modality=...), br.MISSING_FIELD),
    "unknown modality": (c(modality="audio"), br.UNKNOWN_MODALITY),
    "image without image": (c(img_path=None), br.MODALITY_MISMATCH),
    "image path missing": (c(img_path=...), br.MISSING_FIELD),
    "text with image and no text": (c(modality="text"), br.MODALITY_MISMATCH),
    "image,text without text": (c(modality="image,text"), br.MODALITY_MISMATCH),
    "empty text": (c(modality="text", img_path=None, txt=""), br.EMPTY_TEXT),
    "duplicate did": (c("9:1"), br.DUPLICATE_ID),
    "invalid json": ("{'did': '9:3'}", br.INVALID_JSON),
    "not utf-8": (b'{"did": "9:3", "txt": "\xff\xfe"}', br.NOT_UTF8),
    "bad did": (c("9-3"), br.BAD_ID),
    "escaping image path": (c(img_path="mbeir_images/../../etc/passwd"), br.BAD_IMAGE_PATH),
}


@pytest.mark.parametrize("case", list(CAND_CASES))
@pytest.mark.parametrize("reader", ["read_pool", "iter_pool"])
def test_bad_candidate_under_both_policies(tmp_path: Path, case: str, reader: str) -> None:
    bad_line, reason = CAND_CASES[case]
    path = write_jsonl(tmp_path / "cand_pool/local/mbeir_x_cand_pool.jsonl", [c("9:1"), c("9:2"), bad_line, c("9:4")])

    def read(bad: BadRecords) -> list[str]:
        if reader == "read_pool":
            return list(mbeir.read_pool(path, bad=bad))
        return [x.did for x in mbeir.iter_pool(path, bad=bad, seen=set())]

    with pytest.raises(BadRecordError, match=rf"^{path}:3: {reason}: "):
        read(BadRecords("error"))
    bad = BadRecords("skip")
    assert read(bad) == ["9:1", "9:2", "9:4"]
    assert dict(bad.counts) == {reason: 1}


def test_default_policy_is_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [c("9:1"), "not json"])
    with pytest.raises(BadRecordError, match=r"p.jsonl:2: invalid_json: "):
        mbeir.read_pool(path)


def test_positive_absent_from_the_pool(tmp_path: Path) -> None:
    _query_file(tmp_path, q("9:3", pos_cand_list=["9:101", "9:999"]))
    pool = {"9:101": c("9:101")}
    with pytest.raises(BadRecordError, match=r"mbeir_mscoco_task0_test.jsonl:3: positive_not_in_pool: .*'9:999'"):
        mbeir.read_queries(tmp_path, "test", "mscoco_task0", pool=pool)
    bad = BadRecords("skip")
    assert len(mbeir.read_queries(tmp_path, "test", "mscoco_task0", pool=pool, bad=bad)) == 3
    assert dict(bad.counts) == {br.POSITIVE_NOT_IN_POOL: 1}
    assert len(mbeir.read_queries(tmp_path, "test", "mscoco_task0")) == 4  # no pool given: not checked
    _query_file(tmp_path, q("9:3", neg_cand_list=["9:555"]))
    with pytest.raises(BadRecordError, match=r":3: negative_not_in_pool: "):
        mbeir.read_queries(tmp_path, "test", "mscoco_task0", pool=pool)


def test_duplicate_qid_across_files(tmp_path: Path) -> None:
    write_jsonl(mbeir.query_path(tmp_path, "test", "mscoco_task0"), [q("9:1")])
    image_q = q("9:1", query_txt=None, query_img_path="mbeir_images/a.jpg", query_modality="image", task_id=3)
    path = write_jsonl(mbeir.query_path(tmp_path, "test", "mscoco_task3"), [image_q])
    with pytest.raises(BadRecordError, match=rf"^{path}:1: duplicate_id: qid '9:1' appears twice"):
        mbeir.read_queries(tmp_path, "test", ["mscoco_task0", "mscoco_task3"])
    assert len(mbeir.read_queries(tmp_path, "test", "mscoco_task3")) == 1  # unique within one file


def test_skip_report_counts_every_reason(tmp_path: Path) -> None:
    write_jsonl(mbeir.query_path(tmp_path, "test", "mscoco_task0"), [q("9:1"), "{", q("9:2", pos_cand_list=[]), "{"])
    write_jsonl(
        mbeir.query_path(tmp_path, "test", "mscoco_task3"),
        [
            q("9:1", query_txt=None, query_img_path="mbeir_images/a.jpg", query_modality="image", task_id=3),
            q("9:9", query_txt=None, query_img_path="mbeir_images/b.jpg", query_modality="image", task_id=3),
        ],
    )
    bad = BadRecords("skip")
    queries = mbeir.read_queries(tmp_path, "test", ["mscoco_task0", "mscoco_task3"], bad=bad)
    assert [(x.qid, x.task_id) for x in queries] == [("9:1", 0), ("9:9", 3)]
    assert dict(bad.counts) == {br.INVALID_JSON: 2, br.NO_POSITIVES: 1, br.DUPLICATE_ID: 1}
    task0 = mbeir.query_path(tmp_path, "test", "mscoco_task0")
    task3 = mbeir.query_path(tmp_path, "test", "mscoco_task3")
    json_error = "invalid_json: Expecting property name enclosed in double quotes at column 2"
    assert bad.report() == [
        "bad records skipped: 4",
        "  invalid_json: 2",
        f"    e.g. {task0}:2: {json_error}",
        f"    e.g. {task0}:4: {json_error}",
        "  duplicate_id: 1",
        f"    e.g. {task3}:1: duplicate_id: qid '9:1' appears twice",
        "  no_positives: 1",
        f"    e.g. {task0}:3: no_positives: query 9:2 has an empty pos_cand_list",
    ]
    assert BadRecords("skip").report() == ["bad records: none"]


def test_bad_records_policy_object() -> None:
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        BadRecords("ignore")  # type: ignore[arg-type]
    a, b = BadRecords("skip"), BadRecords("skip")
    for i in range(5):
        a.handle(BadRecordError(f"f:{i}", br.INVALID_JSON))
    b.handle(BadRecordError("g:1", br.EMPTY_TEXT, "x"))
    b.handle(BadRecordError("g:2", br.INVALID_JSON))
    total = BadRecords("skip").merge([a, b])
    assert dict(total.counts) == {br.INVALID_JSON: 6, br.EMPTY_TEXT: 1} and total.total == 7
    assert total.examples[br.INVALID_JSON] == ["f:0: invalid_json", "f:1: invalid_json", "f:2: invalid_json"]
    err = pickle.loads(pickle.dumps(BadRecordError("f.jsonl:3", br.EMPTY_TEXT, "query_txt is ''")))
    assert (err.where, err.reason, err.detail) == ("f.jsonl:3", br.EMPTY_TEXT, "query_txt is ''")
    assert str(err) == "f.jsonl:3: empty_text: query_txt is ''"


def test_parse_functions_are_pure() -> None:
    assert mbeir.parse_query(q("9:1"), "x:1") == mbeir.parse_query(q("9:1"), "x:1")
    rec = q("9:1", query_modality="image,text", query_img_path="mbeir_images/a.jpg", task_id=7)
    assert mbeir.parse_query(rec, "here").image_path == "mbeir_images/a.jpg"
    with pytest.raises(BadRecordError, match=r"^shard-2 record 5: no_positives: "):
        mbeir.parse_query(q(pos_cand_list=[]), "shard-2 record 5")
    # Absent nullable fields are null; empty strings where the modality has no text / image are null too.
    cand = mbeir.parse_candidate({"did": "1:2", "modality": "image", "img_path": "x.jpg", "txt": ""}, "w")
    assert cand == Candidate("1:2", None, "x.jpg", "image", None)
    assert mbeir.parse_candidate({"did": "1:2", "modality": "text", "txt": "t", "img_path": ""}, "w").image_path is None
    query = mbeir.parse_query(q("9:1", neg_cand_list=["9:5"], query_src_content='{"a": 1}'), "w")
    assert pickle.loads(pickle.dumps(query)) == query and pickle.loads(pickle.dumps(cand)) == cand  # worker-safe
    with pytest.raises(dataclasses.FrozenInstanceError):
        query.qid = "9:2"  # type: ignore[misc]


def test_image_existence_check_when_asked(tmp_path: Path) -> None:
    (tmp_path / "mbeir_images/mscoco_images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "mbeir_images/mscoco_images/9_1.jpg")
    path = write_jsonl(tmp_path / "pool.jsonl", [c("9:1"), c("9:2")])
    assert len(mbeir.read_pool(path)) == 2  # record validation opens no image
    with pytest.raises(BadRecordError, match=r"pool.jsonl:2: bad_image: image '.*9_2.jpg': missing file"):
        mbeir.read_pool(path, image_root=tmp_path)
    bad = BadRecords("skip")
    assert list(mbeir.read_pool(path, image_root=tmp_path, bad=bad)) == ["9:1"]
    assert dict(bad.counts) == {br.BAD_IMAGE: 1}


# -------------------------------------------------------------------------------------------------- qrels


def test_qrels(tmp_path: Path) -> None:
    path = tmp_path / "qrels/test/mbeir_oven_task6_test_qrels.txt"
    path.parent.mkdir(parents=True)
    path.write_text("5:1 0 5:10 1 6\n5:1 0 6:20 1 6\n5:1 0 5:10 1 6\n\n5:2 0 5:11 0 6\n5:3 0 5:12 1 6\n")
    qrels = mbeir.read_qrels(tmp_path, "test", "oven_task6")
    assert qrels.positives == {"5:1": ("5:10", "6:20"), "5:3": ("5:12",)}  # the InfoSeek copy is a positive
    assert qrels.task_ids == {"5:1": 6, "5:2": 6, "5:3": 6}
    assert mbeir.restrict_positives("5:1", qrels.positives["5:1"]) == ("5:10",)
    path.write_text("5:1 0 5:10 1 6\n5:2 0 5:11 1\n5:1 0 5:13 1 8\n5:4 0 5:14 yes 6\n5:5 0 5:15 1 6\n5:6 0 5:16 1 8\n")
    with pytest.raises(BadRecordError, match=r"mbeir_oven_task6_test_qrels.txt:2: bad_line: "):
        mbeir.read_qrels(tmp_path, "test", "oven_task6")
    bad = BadRecords("skip")
    qrels = mbeir.read_qrels(tmp_path, "test", "oven_task6", bad=bad)
    assert qrels.positives == {"5:1": ("5:10",), "5:5": ("5:15",)}
    # line 3: qid 5:1 with a second task id; line 6: a task 8 line in the task 6 file
    assert dict(bad.counts) == {br.BAD_LINE: 1, br.BAD_TASK: 2, br.BAD_TYPE: 1}
    with pytest.raises(FileNotFoundError, match="mbeir_oven_task8_test_qrels.txt: no test qrels for oven_task8"):
        mbeir.read_qrels(tmp_path, "test", "oven_task8")


# ------------------------------------------------------------------------------------------- instructions


def test_instruction_table(instructions: mbeir.Instructions) -> None:
    assert len(instructions.lookup(9, "text", "image")) == 4
    assert instructions.lookup(9, "image", "text") == (
        "Find an image caption describing the following everyday image.",
    )
    with pytest.raises(mbeir.InstructionNotFoundError, match="dataset 3, query 'text' -> candidate 'image'"):
        instructions.lookup(3, "text", "image")


def test_bad_instruction_rows(tmp_path: Path) -> None:
    path = tmp_path / "i.tsv"
    rows = [
        "text\timage\tMSCOCO\t9\tA",  # 2: fine
        "text\timage\tMSCOCO",  # 3: too few columns
        "text\tvideo\tMSCOCO\t9\tB",  # 4: unknown modality
        "text\timage\tMSCOCO\tnine\tC",  # 5: dataset id
        "text\ttext\tMSCOCO\t9\t\t",  # 6: no instruction
        "text\timage\tMSCOCO\t9\tD",  # 7: duplicate row
    ]
    path.write_text("header\n" + "\n".join(rows) + "\n")
    with pytest.raises(BadRecordError, match=r"i.tsv:3: bad_line: "):
        mbeir.read_instructions(path)
    bad = BadRecords("skip")
    assert mbeir.read_instructions(path, bad=bad).table == {(9, "text", "image"): ("A",)}
    expected = {br.BAD_LINE: 1, br.UNKNOWN_MODALITY: 1, br.BAD_TYPE: 1, br.EMPTY_TEXT: 1, br.DUPLICATE_ID: 1}
    assert dict(bad.counts) == expected


def test_instruction_draw_is_seeded_and_stable(instructions: mbeir.Instructions) -> None:
    query = mbeir.parse_query(q("9:1"), "w")
    options = instructions.lookup(9, "text", "image")
    first = instructions.for_query(query, seed=0)
    assert all(instructions.for_query(query, seed=0) == first for _ in range(3))
    by_seed = {instructions.for_query(query, seed=s) for s in range(20)}
    assert len(by_seed) > 1 and by_seed <= set(options)
    by_qid = [mbeir.instruction_index(0, f"9:{i}", 4) for i in range(400)]
    assert set(by_qid) == {0, 1, 2, 3} and all(60 < by_qid.count(k) < 140 for k in range(4))
    # Pinned: the draw is a hash of (seed, qid), identical across processes, runs and machines.
    assert [mbeir.instruction_index(s, "9:1", 4) for s in range(6)] == PINNED_DRAWS


PINNED_DRAWS = [2, 2, 2, 3, 2, 2]


# Expected values worked out by hand from UniIR's rules (remove \r, strip, strip '"', capitalise, add ".").
FORMAT_CASES = [
    ("a dog on a mat", "A dog on a mat."),
    ("a dog on a mat.", "A dog on a mat."),
    ("is it blue?", "Is it blue?"),
    ("wow!", "Wow!"),
    ('he said "hi."', 'He said "hi.'),  # the closing quote is stripped, then "." ends it
    ('"a quoted caption"', "A quoted caption."),
    ('""', ""),
    ('" spaced "', " spaced ."),  # quotes go after the whitespace strip: inner spaces stay
    ("(see the note.)", "(see the note.)."),  # only the last character counts
    ("  padded \r\n", "Padded."),
    ("car\rriage", "Carriage."),
    ("ends with a comma,", "Ends with a comma,."),
    ("", ""),
    ("   ", ""),
    (None, ""),
    ("Éclair", "Éclair."),
    ("ünïcode", "Ünïcode."),
    ("ß is sharp", "SS is sharp."),  # str.upper of the first character, as UniIR's Python
    ("日本語。", "日本語。."),  # non-ASCII sentence ends are not sentence ends to UniIR
    ("wait…", "Wait…."),
]


@pytest.mark.parametrize(("raw", "formatted"), FORMAT_CASES)
def test_format_text(raw: str | None, formatted: str) -> None:
    assert uniir_format_string(raw) == formatted  # the table is UniIR's rule
    assert mbeir.format_text(raw) == formatted


def test_query_text_with_instruction(instructions: mbeir.Instructions) -> None:
    text_q = mbeir.parse_query(q("9:1", query_txt="a red circle on a grey background"), "w")
    image_q = mbeir.parse_query(
        q("9:2", query_txt=None, query_img_path="mbeir_images/a.jpg", query_modality="image", task_id=3), "w"
    )
    fused_q = mbeir.parse_query(
        q("5:7", query_txt="what is this building", query_img_path="x.jpg", query_modality="image,text", task_id=6),
        "w",
    )
    for seed in range(8):
        instruction = mbeir.format_text(instructions.for_query(text_q, seed))
        assert mbeir.query_text(text_q, instructions, seed=seed) == f"{instruction} a red circle on a grey background."
    # An instruction that already ends a sentence gets no extra period; one that does not gets one.
    assert mbeir.query_text(image_q, instructions, seed=0) == (
        "Find an image caption describing the following everyday image."
    )
    assert mbeir.query_text(fused_q, instructions, seed=3) == (
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image. "
        "what is this building."
    )
    assert mbeir.query_text(fused_q, None, seed=3) == "What is this building."
    assert mbeir.query_text(image_q, None, seed=0) == ""
    instruction, text = mbeir.query_text_parts(fused_q, instructions, seed=3)
    assert (instruction, text) == (
        "Retrieve a Wikipedia paragraph that provides an answer to the given query about the image.",
        "what is this building.",
    )
    assert mbeir.query_text_parts(image_q, instructions, seed=0)[1] == ""
    cand = mbeir.parse_candidate(c("9:3", txt="a caption", img_path=None, modality="text"), "w")
    assert mbeir.candidate_text(cand) == "A caption."
    assert mbeir.candidate_text(mbeir.parse_candidate(c("9:4"), "w")) == ""


def test_query_text_parts_always_join_to_query_text(instructions: mbeir.Instructions) -> None:
    raws = ["x", "  spaced out  ", "ends?", "multi\nline", "\r\ncarriage", 'say "hi"', '"', "   "]
    for i, raw in enumerate(raws):
        query = mbeir.parse_query(q(f"9:{i}", query_txt=raw if raw.strip() else "x"), "w")
        for seed in range(4):
            instruction, text = mbeir.query_text_parts(query, instructions, seed=seed)
            # UniIR: format_string(f"{format_string(instruction)} {query_txt}"), the raw text unstripped.
            drawn = instructions.for_query(query, seed)
            assert instruction == uniir_format_string(drawn)
            expected = uniir_format_string(f"{uniir_format_string(drawn)} {query.text}")
            assert mbeir.query_text(query, instructions, seed=seed) == expected
            assert (f"{instruction} {text}" if text else instruction) == expected


def test_instruction_redrawn_per_epoch_and_copy(instructions: mbeir.Instructions) -> None:
    query = mbeir.parse_query(q("9:1", query_txt="a cat"), "w")
    copy = dataclasses.replace(query, copy=1)
    assert copy == query  # the copy number is not part of a query's identity
    draws = {(c.copy, e): c for c in (query, copy) for e in range(12)}
    texts = {k: mbeir.query_text(c, instructions, seed=0, epoch=k[1]) for k, c in draws.items()}
    assert len(set(texts.values())) > 1  # several instructions are used over epochs and copies
    again = {k: mbeir.query_text(c, instructions, seed=0, epoch=k[1]) for k, c in draws.items()}
    assert again == texts  # deterministic in (seed, qid, copy, epoch)
    # epoch 0 of copy 0 is the evaluation draw, unchanged by the copy/epoch arguments
    assert mbeir.instruction_index(0, "9:1", 4) == mbeir.instruction_index(0, "9:1", 4, copy=0, epoch=0)
    assert [mbeir.instruction_index(0, "9:1", 4, epoch=e) for e in range(1, 9)] != [PINNED_DRAWS[0]] * 8


# --------------------------------------------------------------------------- OVEN / InfoSeek restriction


def test_restriction_only_for_oven_and_infoseek() -> None:
    assert mbeir.restrict_positives("5:1", ["6:3", "5:2", "5:4"]) == ("5:2", "5:4")
    assert mbeir.restrict_positives("6:1", ["5:9", "6:4"]) == ("6:4",)
    assert mbeir.restrict_positives("9:1", ["8:1", "9:2"]) == ("8:1", "9:2")  # other datasets untouched
    assert mbeir.restrict_positives("15:1", ["5:1"]) == ("5:1",)  # dataset 15 is not 5
    query = mbeir.parse_query(
        q("5:1", query_modality="image,text", query_img_path="a.jpg", pos_cand_list=["6:3", "5:2"], task_id=6), "w"
    )
    assert mbeir.for_eval(query).pos_cand_list == ("5:2",)
    assert query.pos_cand_list == ("6:3", "5:2")


def test_restriction_when_reading_for_evaluation(tmp_path: Path) -> None:
    def oven(qid: str, pos: list[str]) -> dict[str, Any]:
        return q(qid, query_modality="image,text", query_img_path="mbeir_images/o.jpg", pos_cand_list=pos, task_id=6)

    write_jsonl(
        mbeir.query_path(tmp_path, "test", "oven_task6"),
        [oven("5:1", ["6:30", "5:10"]), oven("5:2", ["6:31"]), oven("5:3", ["5:11", "5:12"])],
    )
    local_pool = {did: c(did) for did in ["5:10", "5:11", "5:12"]}  # the OVEN pool has no InfoSeek candidates
    queries = mbeir.read_queries(tmp_path, "test", "oven_task6", eval_positives=True, bad=BadRecords("skip"))
    assert [(x.qid, x.pos_cand_list) for x in queries] == [("5:1", ("5:10",)), ("5:3", ("5:11", "5:12"))]
    with pytest.raises(BadRecordError, match=r"mbeir_oven_task6_test.jsonl:2: no_positives: .*own dataset"):
        mbeir.read_queries(tmp_path, "test", "oven_task6", eval_positives=True, pool=local_pool)
    bad = BadRecords("skip")
    assert len(mbeir.read_queries(tmp_path, "test", "oven_task6", eval_positives=True, pool=local_pool, bad=bad)) == 2
    assert dict(bad.counts) == {br.NO_POSITIVES: 1}
    # Without the restriction the InfoSeek positives are checked against the OVEN pool, and fail.
    bad = BadRecords("skip")
    assert [x.qid for x in mbeir.read_queries(tmp_path, "test", "oven_task6", pool=local_pool, bad=bad)] == ["5:3"]
    assert dict(bad.counts) == {br.POSITIVE_NOT_IN_POOL: 2}
