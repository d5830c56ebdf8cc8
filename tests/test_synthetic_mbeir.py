"""tools/make_synthetic_mbeir.py: the M-BEIR layout, record format, labels, determinism and the fusion design."""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import load_tool  # noqa: E402
from PIL import Image

from mmret.data.negatives import read_negatives
from mmret.data.synthetic import DATASETS, FUSION_TASK_IDS, TASK_MODALITIES, TASKS
from mmret.data.synthetic.scenes import _TEXTURE_WORDS
from mmret.data.synthetic.tasks import BOARD_TRAIN_MULTIPLE, Context, board_task, make_kb
from mmret.data.synthetic.writer import (
    CROSS_POSITIVES,
    MODALITY_AWARE_NEGATIVES_RELPATH,
    SPLITS,
    UNION_TRAIN_RELPATH,
    UNION_UP_TRAIN_RELPATH,
    UNION_VAL_RELPATH,
    UP_SAMPLED,
    global_pool_relpath,
    local_pool_relpath,
    qrels_relpath,
    query_relpath,
)

REPO = Path(__file__).resolve().parents[1]
QUERY_FIELDS = {
    "qid": str,
    "query_txt": (str, type(None)),
    "query_img_path": (str, type(None)),
    "query_modality": str,
    "query_src_content": str,
    "pos_cand_list": list,
    "neg_cand_list": list,
    "task_id": int,
}
CAND_FIELDS = {"did": str, "txt": (str, type(None)), "img_path": (str, type(None)), "modality": str, "src_content": str}
ID = re.compile(r"(\d+):([1-9]\d*)")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return load_tool("make_synthetic_mbeir")


@pytest.fixture(scope="module")
def corpus(tool: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mbeir") / "tiny"
    start = time.perf_counter()
    assert tool.main(["--out", str(out), "--scale", "tiny", "--seed", "0"]) == 0
    assert time.perf_counter() - start < 30  # the budget for tiny
    return out


@pytest.fixture(scope="module")
def queries(corpus: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    return {(t.name, s): _jsonl(corpus / query_relpath(t, s)) for t in TASKS for s in SPLITS}


@pytest.fixture(scope="module")
def pools(corpus: Path) -> dict[str, list[dict[str, Any]]]:
    paths = {local_pool_relpath(t, s) for t in TASKS for s in SPLITS} | {global_pool_relpath(s) for s in SPLITS}
    return {p: _jsonl(corpus / p) for p in paths}


def test_layout_has_every_real_path(corpus: Path) -> None:
    expected = {"instructions/query_instructions.tsv"}
    for t in TASKS:
        for s in SPLITS:
            expected.add(f"query/{s}/mbeir_{t.dataset}_task{t.task_id}_{s}.jsonl")
            expected.add(f"qrels/{s}/mbeir_{t.dataset}_task{t.task_id}_{s}_qrels.txt")  # one per dataset-task
        test = "_test" if t.dataset == "mscoco" else ""
        expected.add(f"cand_pool/local/mbeir_{t.dataset}_task{t.task_id}{test}_cand_pool.jsonl")
    expected |= {f"cand_pool/global/mbeir_union_{s}_cand_pool.jsonl" for s in SPLITS}
    expected |= {
        "query/union_train/mbeir_union_up_train.jsonl",  # the file every published recipe trains from
        "query/union_train/mbeir_union_train.jsonl",
        "query/union_val/mbeir_union_val.jsonl",
    }
    assert "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl" in expected
    files = {str(p.relative_to(corpus)) for p in corpus.rglob("*") if p.is_file()}
    assert expected <= files
    assert {f for f in files if not f.startswith("mbeir_images/")} - expected == {
        "cand_pool/local/mbeir_mscoco_task0_cand_pool.jsonl",  # MSCOCO's train/val pools
        "cand_pool/local/mbeir_mscoco_task3_cand_pool.jsonl",
        MODALITY_AWARE_NEGATIVES_RELPATH,  # not M-BEIR: the training queries' modality-aware hard negatives
    }
    assert len(TASKS) == 16 and len({t.name for t in TASKS}) == 16
    assert sorted({t.dataset for t in TASKS}) == sorted(DATASETS)


def test_records_have_exactly_the_format_fields(queries: dict, pools: dict) -> None:
    for (name, _), records in queries.items():
        assert records, name
        for q in records:
            assert set(q) == set(QUERY_FIELDS)
            for key, types in QUERY_FIELDS.items():
                assert isinstance(q[key], types), (name, key)
            assert isinstance(json.loads(q["query_src_content"]), dict)
            assert all(isinstance(d, str) for d in q["pos_cand_list"] + q["neg_cand_list"])
            assert q["pos_cand_list"], q["qid"]
            has = ["image"] * (q["query_img_path"] is not None) + ["text"] * (q["query_txt"] is not None)
            assert q["query_modality"] == ",".join(has)
            assert q["query_txt"] is None or q["query_txt"].strip()
    for records in pools.values():
        for c in records:
            assert set(c) == set(CAND_FIELDS)
            for key, types in CAND_FIELDS.items():
                assert isinstance(c[key], types), key
            assert isinstance(json.loads(c["src_content"]), dict)
            has = ["image"] * (c["img_path"] is not None) + ["text"] * (c["txt"] is not None)
            assert c["modality"] == ",".join(has)


def test_ids_are_unique_and_carry_the_dataset_id(queries: dict, pools: dict) -> None:
    task = {t.name: t for t in TASKS}
    qids = [q["qid"] for records in queries.values() for q in records]
    assert len(qids) == len(set(qids))
    for (name, _), records in queries.items():
        for q in records:
            m = ID.fullmatch(q["qid"])
            assert m and int(m.group(1)) == task[name].dataset_id
            assert q["task_id"] == task[name].task_id
    for path, records in pools.items():
        dids = [c["did"] for c in records]
        assert len(dids) == len(set(dids)), path
        assert all(ID.fullmatch(d) for d in dids)
    for t in TASKS:
        for c in pools[local_pool_relpath(t, "test")]:
            assert int(c["did"].split(":")[0]) == t.dataset_id


def test_positives_are_in_the_pool_and_match_qrels(corpus: Path, queries: dict, pools: dict) -> None:
    """Own-dataset positives are in the task's local pool; the only others are OVEN's / InfoSeek's test
    positives from the partner task's test pool, each a copy (same text and image) of an own positive."""
    by_name = {t.name: t for t in TASKS}
    crossed = 0
    for t in TASKS:
        for s in SPLITS:
            qrels: dict[str, list[str]] = defaultdict(list)
            for line in (corpus / qrels_relpath(t, s)).read_text().splitlines():
                qid, zero, did, one, task_id = line.split(" ")
                assert (zero, one, task_id) == ("0", "1", str(t.task_id))
                qrels[qid].append(did)
            pool = {c["did"]: c for c in pools[local_pool_relpath(t, s)]}
            partner = CROSS_POSITIVES.get(t.name) if s == "test" else None
            other = {c["did"]: c for c in pools[local_pool_relpath(by_name[partner], s)]} if partner else {}
            assert set(qrels) == {q["qid"] for q in queries[(t.name, s)]}
            for q in queries[(t.name, s)]:
                assert q["query_modality"] == TASK_MODALITIES[t.task_id][0]
                own = [d for d in q["pos_cand_list"] if int(d.split(":")[0]) == t.dataset_id]
                cross = [d for d in q["pos_cand_list"] if d not in own]
                assert own and all(pool[d]["modality"] == TASK_MODALITIES[t.task_id][1] for d in own)
                copies = {(pool[d]["txt"], pool[d]["img_path"] and _image_key(corpus, pool[d])) for d in own}
                for did in cross:
                    c = other[did]  # only the partner's test pool holds other positives
                    assert (c["txt"], c["img_path"] and _image_key(corpus, c)) in copies
                crossed += bool(cross)
                assert set(q["neg_cand_list"]) <= set(pool) and not set(q["neg_cand_list"]) & set(q["pos_cand_list"])
                assert qrels[q["qid"]] == q["pos_cand_list"]
    assert crossed >= 24  # most OVEN test queries and some InfoSeek ones have the other dataset's copy


def _image_key(corpus: Path, cand: dict[str, Any]) -> bytes:
    """An image's pixels (the two datasets store the same picture under their own paths)."""
    with Image.open(corpus / cand["img_path"]) as im:
        return im.convert("RGB").tobytes()


def test_union_files_as_uniirs_generator_writes_them(corpus: Path, queries: dict) -> None:
    """union_up_train: every training query, the up-sampled datasets filled to twice their size with copies
    of their own queries (repeated qids, identical lines), shuffled; union_train: each training query once;
    union_val: the val queries."""
    train = {q["qid"]: q for t in TASKS for q in queries[(t.name, "train")]}
    up = _jsonl(corpus / UNION_UP_TRAIN_RELPATH)
    plain = _jsonl(corpus / UNION_TRAIN_RELPATH)
    assert sorted(q["qid"] for q in plain) == sorted(train) and all(train[q["qid"]] == q for q in plain)
    assert [q["qid"] for q in plain] != list(train)  # shuffled
    counts: dict[str, int] = defaultdict(int)
    for q in up:
        assert train[q["qid"]] == q  # a copy is the identical record
        counts[q["qid"]] += 1
    assert set(counts) == set(train)
    per_dataset: dict[str, list[int]] = defaultdict(list)
    for qid, n in counts.items():
        per_dataset[next(d for d, (i, _) in DATASETS.items() if str(i) == qid.split(":")[0])].append(n)
    for dataset, ns in per_dataset.items():
        if dataset in UP_SAMPLED:
            assert sum(ns) == 2 * len(ns) and max(ns) > 1, dataset  # twice the dataset's size
        else:
            assert set(ns) == {1}, dataset
    val = _jsonl(corpus / UNION_VAL_RELPATH)
    assert sorted(q["qid"] for q in val) == sorted(q["qid"] for t in TASKS for q in queries[(t.name, "val")])


def test_global_pool_is_the_union_of_local_test_pools(corpus: Path, pools: dict) -> None:
    for s in SPLITS:
        union = [c for t in TASKS for c in pools[local_pool_relpath(t, s)]]
        assert pools[global_pool_relpath(s)] == union
    assert len({c["did"] for c in pools[global_pool_relpath("test")]}) == len(pools[global_pool_relpath("test")])


def test_same_query_same_positives(queries: dict) -> None:
    for records in queries.values():
        seen: dict[tuple, list[str]] = {}
        for q in records:
            key = (q["query_txt"], q["query_img_path"])
            assert seen.setdefault(key, sorted(q["pos_cand_list"])) == sorted(q["pos_cand_list"])


def test_some_queries_have_several_positives(queries: dict) -> None:
    assert all(len(q["pos_cand_list"]) == 3 for q in queries[("mscoco_task3", "test")])
    several = {name for (name, _), records in queries.items() if any(len(q["pos_cand_list"]) > 1 for q in records)}
    assert {"mscoco_task3", "webqa_task1", "fashion200k_task0"} <= several


def test_instructions_cover_every_modality_combination(corpus: Path, queries: dict, pools: dict) -> None:
    rows = [r.split("\t") for r in (corpus / "instructions/query_instructions.tsv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert header[:4] == ["query_modality", "cand_modality", "dataset_name", "dataset_id"]
    table = {(int(r[3]), r[0], r[1]): [x for x in r[4:] if x.strip()] for r in rows}
    assert len(table) == len(rows) == 16
    by_did = {c["did"]: c for records in pools.values() for c in records}
    used = set()
    for records in queries.values():
        for q in records:
            pos_modality = by_did[q["pos_cand_list"][0]]["modality"]
            used.add((int(q["qid"].split(":")[0]), q["query_modality"], pos_modality))
    assert used == set(table)
    assert all(len(v) >= 4 and len(set(v)) == len(v) for v in table.values())


def test_images_exist_stay_inside_and_decode(corpus: Path, queries: dict, pools: dict) -> None:
    paths = {q["query_img_path"] for records in queries.values() for q in records}
    paths |= {c["img_path"] for records in pools.values() for c in records}
    paths.discard(None)
    root = corpus.resolve()
    for p in paths:
        assert not p.startswith("/") and ".." not in Path(p).parts and p.startswith("mbeir_images/")
        full = (corpus / p).resolve()
        assert full.is_relative_to(root) and full.is_file(), p
    on_disk = {str(p.relative_to(corpus)) for p in (corpus / "mbeir_images").rglob("*.png")}
    assert on_disk == paths  # every image is referenced
    for p in sorted(paths)[:: max(1, len(paths) // 50)]:
        with Image.open(corpus / p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and 56 <= min(im.size) <= max(im.size) <= 112


def test_pools_hold_wrong_modality_distractors(pools: dict) -> None:
    for t in TASKS:
        modalities = {c["modality"] for c in pools[local_pool_relpath(t, "test")]}
        assert t.cand_modality in modalities and modalities - {t.cand_modality}, t.name
    text_to_image = [t for t in TASKS if t.task_id == 0]
    for t in text_to_image:  # the captions that a text-biased retriever would prefer
        assert any(c["modality"] == "text" for c in pools[local_pool_relpath(t, "test")])


def test_modality_aware_negatives_file(corpus: Path, queries: dict, pools: dict) -> None:
    """Every training query: its neg_cand_list, preceded by the wrong-modality candidates of its own content."""
    train_pool = {c["did"]: c for c in pools[global_pool_relpath("train")]}
    negatives = read_negatives(corpus / MODALITY_AWARE_NEGATIVES_RELPATH, pool=train_pool)  # dids in the pool
    with_wrong_modality = defaultdict(int)
    for t in TASKS:
        for q in queries[(t.name, "train")]:
            listed = negatives[q["qid"]]
            assert not set(listed) & set(q["pos_cand_list"]), q["qid"]
            n_wrong = len(listed) - len(q["neg_cand_list"])
            assert n_wrong >= 0 and list(listed[n_wrong:]) == q["neg_cand_list"], q["qid"]
            assert all(train_pool[d]["modality"] != t.cand_modality for d in listed[:n_wrong]), q["qid"]
            with_wrong_modality[t.name] += n_wrong > 0
    assert set(negatives) == {q["qid"] for t in TASKS for q in queries[(t.name, "train")]}
    for t in TASKS:
        if t.task_id in (0, 3):  # a caption of the target scene / another rendering of the query scene
            assert with_wrong_modality[t.name] >= len(queries[(t.name, "train")]) // 3, t.name


def test_fusion_tasks_need_both_modalities(queries: dict) -> None:
    """Equal image + different text -> different positives, and equal text + different image -> different ones."""
    for t in TASKS:
        if t.task_id not in FUSION_TASK_IDS:
            continue
        by_image: dict[str, set] = defaultdict(set)
        by_text: dict[str, set] = defaultdict(set)
        for s in SPLITS:
            for q in queries[(t.name, s)]:
                positives = frozenset(q["pos_cand_list"])
                by_image[q["query_img_path"]].add((q["query_txt"], positives))
                by_text[q["query_txt"]].add((q["query_img_path"], positives))

        def varies(groups: dict[str, set]) -> int:
            return sum(len({p for _, p in g}) > 1 and len({x for x, _ in g}) > 1 for g in groups.values())

        assert varies(by_image) >= 3, t.name
        assert varies(by_text) >= 3, t.name


def test_task2_candidates_need_both_modalities(queries: dict, pools: dict) -> None:
    """EDIS: a positive shares its image with other-text candidates and its text with other-image ones.
    WebQA: the query's exhibition (named in the text) has at least six candidates, the positive among them."""
    edis = [c for c in pools[local_pool_relpath(TASKS[4], "test")] if c["modality"] == "image,text"]
    assert TASKS[4].name == "edis_task2" and TASKS[5].name == "webqa_task2"
    by_did = {c["did"]: c for c in edis}
    for q in queries[("edis_task2", "test")]:
        pos = by_did[q["pos_cand_list"][0]]
        assert sum(c["img_path"] == pos["img_path"] for c in edis) >= 6
        assert sum(c["txt"] == pos["txt"] for c in edis) >= 6
    webqa = [c for c in pools[local_pool_relpath(TASKS[5], "test")] if c["modality"] == "image,text"]
    by_did = {c["did"]: c for c in webqa}
    for q in queries[("webqa_task2", "test")]:
        place = re.search(r"(\w+) exhibition", q["query_txt"]).group(1)  # type: ignore[union-attr]
        assert sum(f"{place} exhibition" in c["txt"] for c in webqa) >= 6
        assert place in by_did[q["pos_cand_list"][0]]["txt"]


_SUMMARY = re.compile(r"^(\w+) is an? (\w+) (\w+) (\w+) from the ")


def test_board_questions_name_one_entity_of_the_board(queries: dict, pools: dict) -> None:
    """OVEN / InfoSeek: the attribute value a question names is held by exactly the asked entity on its board
    (so the image decides) and by more than five entities of the knowledge base (so the text alone does not)."""
    looks = {}  # entity name -> {attribute: value}, read back from the OVEN task 6 summaries
    for c in pools[local_pool_relpath(TASKS[10], "test")]:
        if c["txt"] and (m := _SUMMARY.match(c["txt"])):
            looks[m.group(1)] = {"colour": m.group(2), "texture": m.group(3), "shape": m.group(4)}
    textures = {word: texture for texture, words in _TEXTURE_WORDS.items() for word in words}
    looks = {n: {**v, "texture": textures[v["texture"]]} for n, v in looks.items()}
    assert TASKS[10].name == "oven_task6" and len(looks) >= 60
    checked = 0
    for t in TASKS:
        if t.task_id not in (6, 8):
            continue
        for s in SPLITS:
            by_did = {c["did"]: c for c in pools[local_pool_relpath(t, s)]}
            for q in queries[(t.name, s)]:
                meta = json.loads(q["query_src_content"])
                attr, value = meta["pointer"]
                others = meta["board_entities"]
                assert 5 <= len(others) <= 7, t.name  # 6-8 entities on the board
                for did in q["pos_cand_list"]:
                    if did not in by_did:  # the other dataset's copy (checked in the test above)
                        continue
                    (asked,) = set(re.findall(r"\w+", by_did[did]["txt"])) & set(looks)
                    assert looks[asked][attr] == value and asked not in others, (t.name, q["qid"])
                assert all(looks[o][attr] != value for o in others), (t.name, q["qid"])
                assert sum(v[attr] == value for v in looks.values()) > 5, (t.name, value)
                checked += 1
    assert checked >= 4 * 24


def test_same_seed_same_bytes_other_seed_differs(tool: ModuleType, corpus: Path, tmp_path: Path) -> None:
    assert tool.main(["--out", str(tmp_path / "again"), "--seed", "0"]) == 0
    assert tool.main(["--out", str(tmp_path / "other"), "--seed", "1"]) == 0
    reference = _tree_hash(corpus)
    assert _tree_hash(tmp_path / "again") == reference
    assert _tree_hash(tmp_path / "other") != reference


def test_cli_refuses_bad_input(tool: ModuleType, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert tool.main(["--out", str(corpus)]) == 2
    assert "exists" in capsys.readouterr().err
    assert tool.main(["--out", str(tmp_path / "x"), "--seed", "-1"]) == 2
    assert "seed" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path / "y"), "--scale", "huge"])


def test_reader_agrees(corpus: Path) -> None:
    """The M-BEIR reader (mmret.data.mbeir) accepts the corpus: records, pools, images, qrels, instructions."""
    mbeir = pytest.importorskip("mmret.data.mbeir")
    assert mbeir.TASK_MODALITIES == TASK_MODALITIES
    assert {k: v[0] for k, v in DATASETS.items()} == mbeir.DATASET_IDS
    assert [t.name for t in mbeir.EVAL_TASKS] == [t.name for t in TASKS]
    instructions = mbeir.read_instructions(corpus)
    for t in TASKS:
        for s in SPLITS:
            assert mbeir.local_pool_path(corpus, t.name, s) == corpus / local_pool_relpath(t, s)
            pool = mbeir.read_local_pool(corpus, t.name, s, image_root=corpus)
            # test: OVEN/InfoSeek positives include the partner's copies, outside the local pool
            own = s == "test"
            for q in mbeir.read_queries(corpus, s, t.name, pool=pool, image_root=corpus, eval_positives=own):
                assert mbeir.query_text(q, instructions, seed=0)
            assert mbeir.read_qrels(corpus, s, t.name).positives
    assert len(mbeir.read_global_pool(corpus, "test")) == sum(
        len(mbeir.read_local_pool(corpus, t.name, "test")) for t in TASKS
    )
    train_pool = mbeir.read_global_pool(corpus, "train")
    up = mbeir.read_union_queries(mbeir.union_query_path(corpus, "train"), pool=train_pool, image_root=corpus)
    assert max(q.copy for q in up) >= 1 and len(up) > len({q.qid for q in up})
    assert all(q.copy == 0 for q in mbeir.read_union_queries(corpus / UNION_TRAIN_RELPATH, pool=train_pool))


def test_board_tasks_get_more_training_queries_without_a_larger_pool(queries: dict, pools: dict) -> None:
    """The board tasks' pool is the knowledge base: more (training) queries add boards, not candidates."""
    assert BOARD_TRAIN_MULTIPLE > 1
    for t in TASKS:
        expected = 24 * (BOARD_TRAIN_MULTIPLE if t.task_id in (6, 8) else 1)
        assert len(queries[(t.name, "train")]) == expected, t.name
    ctx = Context(make_kb(random.Random(0), 64))
    for info, candidate in ((False, "text"), (True, "image,text")):
        few, many = (board_task(info, candidate)(random.Random(1), n, ctx) for n in (12, 96))
        assert len(many.queries) == 96
        assert {(c.txt, c.img) for c in few.pool} == {(c.txt, c.img) for c in many.pool}


def test_global_pool_scores_either_copy_of_an_oven_infoseek_entity(corpus: Path) -> None:
    """On the global pool a ranking that puts the other dataset's copy first scores a hit (UniIR's rule: every
    qrels positive), where the old own-dataset restriction would have scored a miss."""
    from mmret.data import mbeir
    from mmret.eval.metrics import evaluate_task

    for name in CROSS_POSITIVES:
        positives = mbeir.read_qrels(corpus, "test", name).positives
        global_pool = mbeir.read_global_pool(corpus, "test")
        qids = [q for q, dids in positives.items() if mbeir.restrict_positives(q, dids) != dids]
        assert qids, name
        ranked = [[next(d for d in positives[q] if d not in mbeir.restrict_positives(q, positives[q]))] for q in qids]
        assert all(r[0] in global_pool for r in ranked)
        assert evaluate_task(name, qids, ranked, positives).recall[1] == 100.0
        own = {q: mbeir.restrict_positives(q, positives[q]) for q in qids}
        assert evaluate_task(name, qids, ranked, own).recall[10] == 0.0
