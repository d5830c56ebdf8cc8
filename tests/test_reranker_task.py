"""The reranker task: its training pairs follow U-MARVEL's sampling (a positive from the record's
``pos_cand_list``, a negative from its retrieved list minus the positives), and the trainer trains it."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import numpy as np
import pytest

from mmret.data.mbeir import read_local_pool, read_queries
from mmret.data.negatives import write_negatives
from mmret.recipe import as_trainer_config

TASKS = ("cirr_task7", "webqa_task1")


@pytest.fixture(scope="module")
def negatives(tiny_mbeir, tmp_path_factory) -> Path:
    """Each training query's 'retrieved' list: the first 12 dids of its task's local pool (its positives
    among them where they come first)."""
    path = tmp_path_factory.mktemp("negatives") / "negatives.jsonl"
    rows = []
    for task in TASKS:
        pool = list(read_local_pool(tiny_mbeir, task))[:12]
        rows += [(q.qid, pool) for q in read_queries(tiny_mbeir, "train", task)]
    write_negatives(path, rows)
    return path


def reranker_config(tiny_mbeir, processor_dir, negatives, **top):
    return as_trainer_config(
        {
            "task": "reranker",
            "model": {"preset": "tiny", "seed": 0},
            "data": {
                "root": str(tiny_mbeir),
                "tasks": list(TASKS),
                "processor_dir": str(processor_dir),
                "negatives_file": str(negatives),
                "processor": {"max_pixels": 64 * 28 * 28},
                "pipeline": {"batch_size": 4, "seed": 0},
            },
            "rerank": {"max_length": 256, "max_patches": 8 * 2 * 64},
            "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
            **top,
        }
    )


def test_pairs_are_a_positive_and_a_listed_negative(tiny_mbeir, processor_dir, negatives):
    from mmret import build
    from mmret.data.negatives import read_negatives
    from mmret.tasks.reranker.data import EncodePairs

    cfg = reranker_config(tiny_mbeir, processor_dir, negatives)
    inputs = build.open_inputs(cfg)
    encode = EncodePairs(inputs.store, inputs.processor, cfg.data.pipeline, rerank=cfg.rerank)
    listed = read_negatives(negatives)
    positives = {q.qid: set(q.pos_cand_list) for t in TASKS for q in read_queries(tiny_mbeir, "train", t)}
    rng = np.random.default_rng(0)
    drawn = set()
    for index in range(len(inputs.store.queries)):
        ex = encode((index, 0), rng)
        pos, neg = ex.dids
        assert pos in positives[ex.qid] and neg in set(listed[ex.qid]) - positives[ex.qid]
        decoded = inputs.processor.decode(ex.positive.example.input_ids)
        assert decoded.endswith("<|im_start|>assistant\nYes<|im_end|>\n") and "Query:" in decoded
        assert inputs.processor.decode(ex.negative.target_ids) == "<|im_start|>assistant\nNo<|im_end|>\n"
        drawn.add(neg)
    assert len(drawn) > 5  # drawn at random from the list, not its first entry


def test_the_reranker_trains(tiny_mbeir, processor_dir, negatives, tmp_path):
    """Through the trainer's own entry point, on one simulated device (sharding has its own tests)."""
    from mmret.recipe import config_to_json

    cfg = reranker_config(
        tiny_mbeir,
        processor_dir,
        negatives,
        optimizer={"learning_rate": 3e-2, "warmup_steps": 0, "total_steps": 4},
        log_every=1,
        checkpoint={"every": 4, "keep": 1},
    )
    (tmp_path / "cfg.json").write_text(json.dumps(config_to_json(cfg)))
    r = helpers.run_trainer(tmp_path / "cfg.json", tmp_path / "run", devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 5))
    assert losses[-1] < 0.7 * losses[0], losses  # the assistant turn's scaffold is learnt fast
    assert all(0 <= r["accuracy"] <= 1 for r in records)
    assert (tmp_path / "run" / "checkpoints" / "4").is_dir()
