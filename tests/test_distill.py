"""Distillation (U-MARVEL's stage 5) in parts: the teacher's seeded query sample, the teacher file's reader,
the listwise training examples, and the step's loss against a numpy restatement of U-MARVEL's. The whole
stage (teacher built from a retriever and a reranker, then trained) runs in tests/test_recipes.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import ref_info_nce, umarvel_distill_loss, unit

from mmret.data.mbeir import read_local_pool, read_queries
from mmret.data.stores import sample_queries
from mmret.data.teacher import read_teacher
from mmret.recipe import as_trainer_config

TASKS = ("cirr_task7", "webqa_task1")
LENGTHS = {"cirr_task7": 7, "webqa_task1": 3}  # webqa's lists are shorter than top_k: padded and masked


@pytest.fixture(scope="module")
def teacher_file(tiny_mbeir, tmp_path_factory) -> Path:
    """Every other training query of TASKS with a list of its task's local pool (shuffled per query) and
    made-up fused scores."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.jsonl"
    lines = []
    for task in TASKS:
        pool = list(read_local_pool(tiny_mbeir, task))
        for q in read_queries(tiny_mbeir, "train", task)[::2]:
            dids = [pool[i] for i in rng.permutation(len(pool))[: LENGTHS[task]]]
            fused = np.round(rng.uniform(0, 2, len(dids)), 6).tolist()
            lines.append(json.dumps({"qid": q.qid, "task": task, "dids": dids, "fused": fused}))
    path.write_text("\n".join(lines) + "\n")
    return path


def distill_config(tiny_mbeir, processor_dir, teacher_file, **distill):
    return as_trainer_config(
        {
            "task": "distill",
            "model": {"preset": "tiny", "seed": 0},
            "data": {
                "root": str(tiny_mbeir),
                "tasks": list(TASKS),
                "processor_dir": str(processor_dir),
                "processor": {"max_pixels": 64 * 28 * 28},
                "pipeline": {
                    "batch_size": 4,
                    "max_query_patches": 4 * 64,
                    "max_candidate_patches": 4 * 6 * 64,
                    "max_query_length": 96,
                    "max_candidate_length": 96,
                },
            },
            "distill": {"teacher_file": str(teacher_file), "top_k": 5, **distill},
        }
    )


def test_sample_queries_is_a_seeded_nested_fraction_in_file_order(tiny_mbeir):
    queries = read_queries(tiny_mbeir, "train", "cirr_task7")
    n = len(queries)
    small, large = sample_queries(queries, 0.1, seed=3), sample_queries(queries, 0.3, seed=3)
    assert len(small) == math.ceil(0.1 * n) and len(large) == math.ceil(0.3 * n)
    assert {q.qid for q in small} <= {q.qid for q in large}  # a larger fraction keeps the smaller one's
    order = {q.qid: i for i, q in enumerate(queries)}
    assert [order[q.qid] for q in large] == sorted(order[q.qid] for q in large)  # file order
    shuffled = [queries[i] for i in np.random.default_rng(0).permutation(n)]
    assert {q.qid for q in sample_queries(shuffled, 0.3, seed=3)} == {q.qid for q in large}  # qid-keyed
    assert {q.qid for q in sample_queries(queries, 0.3, seed=4)} != {q.qid for q in large}
    assert sample_queries(queries, 1.0, seed=3) == list(queries)


def test_read_teacher_names_the_file_and_line_of_a_bad_record(tmp_path):
    path = tmp_path / "teacher.jsonl"
    path.write_text(
        '{"qid": "1:1", "task": "t", "dids": ["a", "b"], "fused": [1.0, 0.5]}\n{"qid": "1:2", "dids": []}\n'
    )
    with pytest.raises(ValueError, match=rf"{path}:2: not a teacher record"):
        read_teacher(path)
    path.write_text('{"qid": "1:1", "task": "t", "dids": ["a", "b"], "fused": [1.0]}\n')
    with pytest.raises(ValueError, match=rf"{path}:1: query 1:1: 2 dids and 1 fused"):
        read_teacher(path)
    with pytest.raises(FileNotFoundError, match="teacher_from"):
        read_teacher(tmp_path / "none.jsonl")


@pytest.mark.parametrize("infonce", [False, True])
def test_examples_are_each_querys_teacher_list(tiny_mbeir, processor_dir, teacher_file, infonce):
    from mmret import tasks
    from mmret.data.pipeline import EncodeTrainExample
    from mmret.tasks.distill.data import EncodeList, collate_lists

    cfg = distill_config(tiny_mbeir, processor_dir, teacher_file, infonce_weight=0.5 if infonce else 0.0)
    inputs = tasks.get("distill").open_inputs(cfg)
    lists = read_teacher(teacher_file)
    assert {q.qid for q in inputs.store.queries} == set(lists)  # only the teacher's queries are trained on
    encode = EncodeList(inputs.store, inputs.processor, cfg.data.pipeline, lists=lists, distill=cfg.distill)
    plain = EncodeTrainExample(inputs.store, inputs.processor, cfg.data.pipeline)
    positives = {q.qid: set(q.pos_cand_list) for t in TASKS for q in read_queries(tiny_mbeir, "train", t)}
    rng = np.random.default_rng(0)
    examples = [encode((i, 0), rng) for i in range(4)]
    for ex in examples:
        entry, k = lists[ex.qid], cfg.distill.top_k
        n = min(k, len(entry.dids))
        listed = ex.dids[1:] if infonce else ex.dids
        assert listed == [*entry.dids[:n], *[entry.dids[n - 1]] * (k - n)]
        assert ex.list_mask.tolist() == [True] * n + [False] * (k - n)
        np.testing.assert_allclose(ex.teacher, [*entry.fused[:n], *[entry.fused[n - 1]] * (k - n)], rtol=1e-6)
        if infonce:
            assert ex.dids[0] in positives[ex.qid]
        for did, cand in zip(ex.dids, ex.candidates, strict=True):  # each candidate encoded as training does
            np.testing.assert_array_equal(cand.input_ids, plain._candidate(did).input_ids)
    batch = collate_lists(examples, inputs.processor, cfg.data.pipeline)
    per = cfg.distill.top_k + infonce
    assert batch["candidates"]["input_ids"].shape[0] == 4 * per
    assert batch["teacher"].shape == batch["list_mask"].shape == (4, cfg.distill.top_k)
    assert batch["meta"]["dids"] == [d for ex in examples for d in ex.dids]


@pytest.mark.parametrize("infonce_weight", [0.0, 0.3])
def test_distill_loss_equals_umarvels_on_each_querys_list(infonce_weight):
    from mmret.tasks.distill.step import DistillStepConfig, distill_loss

    rng = np.random.default_rng(1)
    b, k, d, tau = 3, 6, 16, 0.05
    per = k + (infonce_weight > 0)
    q, c = unit(rng, b, d), unit(rng, b * per, d)
    teacher = rng.uniform(0, 2, (b, k)).astype(np.float32)
    mask = np.ones((b, k), bool)
    mask[1, 4:] = False  # a padded list
    positive_mask = np.zeros((b, b * per), bool)
    positive_mask[np.arange(b), np.arange(b) * per] = True
    batch = {
        "teacher": jnp.asarray(teacher),
        "list_mask": jnp.asarray(mask),
        "positive_mask": jnp.asarray(positive_mask),
    }
    cfg = DistillStepConfig(teacher_scale=0.5, infonce_weight=infonce_weight)
    loss, metrics = distill_loss(jnp.asarray(q), jnp.asarray(c), batch, jnp.float32(tau), cfg)

    lists = c.reshape(b, per, d)[:, per - k :]
    cos = np.einsum("bd,bkd->bk", q.astype(np.float64), lists.astype(np.float64))
    kl = np.mean(
        [umarvel_distill_loss(cos[i : i + 1, mask[i]], teacher[i : i + 1, mask[i]], tau, tau) for i in range(b)]
    )
    expected = kl
    if infonce_weight:
        nce, _ = ref_info_nce(q, c, np.arange(b) * per, positive_mask, tau=tau)
        expected = kl + infonce_weight * nce
    np.testing.assert_allclose(float(loss), expected, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=2e-4, atol=2e-6)
    top1 = np.mean(
        [
            np.argmax(np.where(mask[i], cos[i], -np.inf)) == np.argmax(np.where(mask[i], teacher[i], -np.inf))
            for i in range(b)
        ]
    )
    assert float(metrics["top1_agreement"]) == pytest.approx(top1)


def test_a_stage_distills_only_from_an_earlier_reranker_and_retriever():
    from mmret import chain

    def stages(*specs):
        return as_trainer_config({"model": {"preset": "tiny"}, "stages": list(specs)})

    with pytest.raises(ValueError, match=r"stages\[1\].teacher_from: needs init_from"):
        chain.check_stages(stages({"name": "rr"}, {"name": "d", "teacher_from": "rr"}))
    with pytest.raises(ValueError, match=r"stages\[1\].teacher_from: 'later' is not an earlier stage"):
        chain.check_stages(stages({"name": "ret"}, {"name": "d", "init_from": "ret", "teacher_from": "later"}))
    cfg = stages({"name": "ret"}, {"name": "rr"}, {"name": "d", "init_from": "ret", "teacher_from": "rr"})
    chain.check_stages(cfg)
    assert chain.stage_config(cfg, "d", "/w").distill.teacher_file == "/w/d/teacher/teacher.jsonl"
    with pytest.raises(chain.StageOrderError, match="stage d distills stage rr, which has not finished"):
        chain.teacher_for(cfg, "/nonexistent", "d")
