"""A hand-written miniature of the real M-BEIR release's layout (UniIR's files, not the synthetic writer's):
per-task qrels named after their query files, an up-sampled union training file with repeated qids against
the union training pool, an OVEN query whose qrels also hold InfoSeek's copy of its entity, and quoted texts.

It is read, trained on and scored by mmret exactly as UniIR's rules say (restated independently here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import uniir_format_string  # noqa: E402
from PIL import Image

from mmret.data import mbeir
from mmret.data.pipeline import PipelineConfig, train_dataset
from mmret.data.processor import Processor, ProcessorConfig
from mmret.data.stores import RawStore
from mmret.eval.evaluate import positives_for
from mmret.eval.metrics import evaluate_task


def _q(qid, txt, img, modality, pos, task, neg=()):
    return {
        "qid": qid,
        "query_txt": txt,
        "query_img_path": img,
        "query_modality": modality,
        "query_src_content": "{}",
        "pos_cand_list": list(pos),
        "neg_cand_list": list(neg),
        "task_id": task,
    }


def _c(did, txt, img, modality):
    return {"did": did, "txt": txt, "img_path": img, "modality": modality, "src_content": "{}"}


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# The training queries: one MSCOCO text->image query, one OVEN (image,text)->text query with a quoted text.
COCO_TRAIN = _q("9:5", '"a dog" on a mat', None, "text", ["9:101"], 0)
OVEN_TRAIN = _q("5:5", "which tower is this?", "mbeir_images/oven/b.png", "image,text", ["5:105"], 6)
TRAIN_POOL = [
    _c("5:105", "The Eiffel Tower, a wrought-iron lattice tower in Paris", None, "text"),
    _c("9:101", None, "mbeir_images/mscoco/a.png", "image"),
    _c("9:102", None, "mbeir_images/mscoco/b.png", "image"),
]
# UniIR's generator up-samples by appending random copies: the MSCOCO query appears three times.
UNION_UP_TRAIN = [COCO_TRAIN, OVEN_TRAIN, COCO_TRAIN, COCO_TRAIN]
INSTRUCTIONS = [
    ["query_modality", "cand_modality", "dataset_name", "dataset_id", "prompt_1", "prompt_2"],
    ["text", "image", "MSCOCO", "9", '"Find the photo described', "Retrieve the image of this caption"],
    ["image,text", "text", "OVEN", "5", "Find the passage about the entity in the image", ""],
    ["image,text", "text", "INFOSEEK", "6", "Answer the question about the image with a passage", ""],
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("release") / "M-BEIR"
    for name, colour in (("mscoco/a", (200, 30, 30)), ("mscoco/b", (30, 200, 30)), ("oven/a", (30, 30, 200))):
        path = r / "mbeir_images" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (56, 56), colour).save(path)
    Image.new("RGB", (56, 84), (90, 90, 90)).save(r / "mbeir_images/oven/b.png")
    (r / "instructions").mkdir()
    (r / "instructions/query_instructions.tsv").write_text("".join("\t".join(row) + "\n" for row in INSTRUCTIONS))
    _jsonl(r / "query/union_train/mbeir_union_up_train.jsonl", UNION_UP_TRAIN)
    _jsonl(r / "query/union_train/mbeir_union_train.jsonl", [COCO_TRAIN, OVEN_TRAIN])
    _jsonl(r / "cand_pool/global/mbeir_union_train_cand_pool.jsonl", TRAIN_POOL)
    # Test: the OVEN query's qrels also name InfoSeek's copy of the entity (6:200), absent from OVEN's pool.
    oven = [
        _c("5:200", "The Eiffel Tower, a lattice tower in Paris", None, "text"),
        _c("5:201", "Big Ben", None, "text"),
    ]
    infoseek = [_c("6:200", "The Eiffel Tower, a lattice tower in Paris", None, "text")]
    coco = [
        _c("9:201", None, "mbeir_images/mscoco/a.png", "image"),
        _c("9:202", None, "mbeir_images/mscoco/b.png", "image"),
    ]
    _jsonl(r / "cand_pool/local/mbeir_oven_task6_cand_pool.jsonl", oven)
    _jsonl(r / "cand_pool/local/mbeir_infoseek_task6_cand_pool.jsonl", infoseek)
    _jsonl(r / "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl", coco)
    _jsonl(r / "cand_pool/global/mbeir_union_test_cand_pool.jsonl", oven + infoseek + coco)
    tests = {
        "oven_task6": [_q("5:1", '"what is this?"', "mbeir_images/oven/a.png", "image,text", ["5:200", "6:200"], 6)],
        "infoseek_task6": [_q("6:1", "where is it?", "mbeir_images/oven/a.png", "image,text", ["6:200", "5:200"], 6)],
        "mscoco_task0": [_q("9:1", "a red square.", None, "text", ["9:201"], 0)],
    }
    for task, queries in tests.items():
        _jsonl(r / f"query/test/mbeir_{task}_test.jsonl", queries)
        lines = [f"{q['qid']} 0 {d} 1 {q['task_id']}\n" for q in queries for d in q["pos_cand_list"]]
        (r / "qrels/test").mkdir(parents=True, exist_ok=True)
        (r / f"qrels/test/mbeir_{task}_test_qrels.txt").write_text("".join(lines))
    return r


@pytest.fixture(scope="module")
def processor(processor_dir) -> Processor:
    return Processor(processor_dir, ProcessorConfig(template="plain", max_pixels=16 * 28 * 28))


def test_training_reads_the_up_sampled_union_file(root, processor):
    store = RawStore(root, "train")  # data.query_file="auto": the union file, against the union pool
    assert store.query_file == root / "query/union_train/mbeir_union_up_train.jsonl"
    assert [q.qid for q in store.queries] == ["9:5", "5:5", "9:5", "9:5"]  # every line an example
    assert [q.copy for q in store.queries] == [0, 0, 1, 2]
    assert len(RawStore(root, "train", tasks=["mscoco_task0"]).queries) == 3  # data.tasks filters the file
    assert len(RawStore(root, "train", query_file="union").queries) == 2
    # Each read of a query draws its instruction afresh, and the text is UniIR's format_string(instr + " " + txt).
    texts = set()
    for epoch in range(6):
        for query in store.queries:
            drawn = store.instructions.for_query(query, 0, epoch=epoch)
            want = uniir_format_string(f"{uniir_format_string(drawn)} {query.text}")
            assert mbeir.query_text(query, store.instructions, seed=0, epoch=epoch) == want
            texts.add(want)
    # both MSCOCO instructions are used, the quoted one stripped of its quote; the text's inner quotes stay
    assert 'Find the photo described. "a dog" on a mat.' in texts
    assert 'Retrieve the image of this caption. "a dog" on a mat.' in texts


def test_a_training_batch_holds_each_copy_and_the_pipeline_texts(root, processor):
    store = RawStore(root, "train")
    cfg = PipelineConfig(
        batch_size=4,
        max_query_length=64,
        max_candidate_length=64,
        max_query_patches=256,
        max_candidate_patches=256,
        shuffle=False,
    )
    batch = next(iter(train_dataset(store, processor, cfg, process_index=0, process_count=1)))
    assert batch["meta"]["qids"] == ["9:5", "5:5", "9:5", "9:5"]
    # The copies of 9:5 are the same query with the same positive: each is the other's in-batch positive.
    assert batch["positive_mask"][0].tolist() == [True, False, True, True]
    ids = batch["query"]["input_ids"]
    for row, query in enumerate(store.queries):
        instruction, text = mbeir.query_text_parts(query, store.instructions, seed=0)
        expect = processor(text=text or None, instruction=instruction or None).input_ids
        if query.image_path is None:
            np.testing.assert_array_equal(ids[row, : len(expect)], expect)
            rendered = processor.decode(expect)
            assert rendered == uniir_format_string(f"{instruction} {query.text}")


def test_the_trainer_trains_on_the_union_file(root, processor_dir, tmp_path):
    import dataclasses

    from helpers import eval_trainer_config

    from mmret.optim import OptimizerConfig
    from mmret.recipe import CheckpointConfig
    from mmret.train.trainer import train

    cfg = dataclasses.replace(
        eval_trainer_config(root, processor_dir, tasks=["mscoco_task0"]),
        epochs=4.0,  # 4 epochs of the 4-line union file at a global batch of 8: 2 steps, derived from the file
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0),
        log_every=1,
        checkpoint=CheckpointConfig(every=2, keep=1),
    )
    train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_scoring_counts_every_qrels_positive(root):
    """UniIR's retriever: a query scores when any positive of its task's qrels file is in its top k."""
    tasks = ["oven_task6", "infoseek_task6", "mscoco_task0"]
    positives = positives_for(root, "test", tasks)  # one qrels file per dataset-task
    assert positives == {"5:1": ("5:200", "6:200"), "6:1": ("6:200", "5:200"), "9:1": ("9:201",)}
    # On the global pool the OVEN query retrieves InfoSeek's copy first: a hit at 1.
    assert evaluate_task("oven_task6", ["5:1"], [["6:200", "5:201", "5:200"]], positives).recall[1] == 100.0
    # Its own-dataset positive at rank 3 hits at 5; a ranking with neither copy misses.
    assert evaluate_task("oven_task6", ["5:1"], [["5:201", "9:201", "5:200"]], positives).recall == {
        1: 0.0,
        5: 100.0,
        10: 100.0,
    }
    assert evaluate_task("infoseek_task6", ["6:1"], [["5:201", "9:202"]], positives).recall[10] == 0.0
    # The own-dataset positives (which key the instruction, and must be in the local pool) are in it.
    for task in tasks:
        pool = mbeir.read_local_pool(root, task)
        for query in mbeir.read_queries(root, "test", task, pool=pool, eval_positives=True):
            assert set(query.pos_cand_list) <= set(pool)
            assert mbeir.restrict_positives(query.qid, positives[query.qid]) == query.pos_cand_list
