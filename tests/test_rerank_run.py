"""Reranking a retrieval run (``mmret.eval.rerank``) on the tiny corpus: P(yes) of every rescored pair equals
the reranker run on that pair alone, the reranked TREC files are the fused order recomputed here, the report's
recalls are UniIR's scorer on those files, w is chosen on validation lists with the test qrels absent, and a
rerun reuses the scores."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import eval_trainer_config

from mmret.data.bad_records import BadRecords
from mmret.data.mbeir import read_local_pool, read_qrels, read_queries
from mmret.data.processor import Processor
from mmret.data.rerank_pairs import PairRenderer, collate_pairs
from mmret.data.rerank_prompts import UMARVEL
from mmret.data.stores import EvalStore
from mmret.eval.metrics import read_trec, write_trec
from mmret.recipe import RerankConfig

TASKS = ["cirr_task7"]  # (image, text) -> image: both images in every pair
TOP = 3
ALONE = 1  # queries per task whose pairs are also scored one by one


@pytest.fixture(scope="module")
def runs(tiny_mbeir, tmp_path_factory):
    """Retrieval runs of the task's test and val queries as --mode=eval writes them (``<task>.trec``, a
    report.json naming the tasks and the pool): each query's local pool in a seeded random order with
    decreasing cosines (reranking reads the lists, not the retriever). Each list holds a positive."""
    base = tmp_path_factory.mktemp("rerank")
    rng = np.random.default_rng(0)
    out = {}
    for split in ("test", "val"):
        pool = list(read_local_pool(tiny_mbeir, TASKS[0], split))
        positives = read_qrels(tiny_mbeir, split, TASKS[0]).positives
        qids = [q.qid for q in read_queries(tiny_mbeir, split, TASKS[0])]
        ranked, scores = [], []
        for qid in qids:
            others = [d for d in pool if d not in positives[qid]]
            picks = [others[int(i)] for i in rng.choice(len(others), 2 * TOP, replace=False)]
            picks.insert(int(rng.integers(TOP)), sorted(positives[qid])[0])  # a positive within the top TOP
            ranked.append(picks)
            scores.append(sorted(rng.uniform(0.2, 0.9, len(picks)).tolist(), reverse=True))
        out[split] = base / split
        out[split].mkdir()
        write_trec(out[split] / f"{TASKS[0]}.trec", qids, ranked, scores, tag="test")
        (out[split] / "report.json").write_text(json.dumps({"pool": "local", "tasks": {TASKS[0]: {}}}))
    return base, out


def reranker_cfg(root, processor_dir, **rerank):
    cfg = eval_trainer_config(root, processor_dir, TASKS)
    r = RerankConfig(top_k=TOP, batch_size=8, max_length=256, max_patches=8 * 2 * 64, **rerank)
    return dataclasses.replace(cfg, task="reranker", rerank=r)


@pytest.fixture(scope="module")
def model():
    from mmret import models
    from mmret.models.reranker import Reranker

    return Reranker(models.from_preset("tiny", seed=3, dtype="float32", with_lm_head=True))


def test_weights_are_chosen_on_validation_lists_without_the_test_qrels(
    runs, tiny_mbeir, processor_dir, model, tmp_path
):
    from mmret import build
    from mmret.eval.rerank import Scorer, choose_weights, fused, read_run, select_weights

    root = tmp_path / "mbeir"
    shutil.copytree(tiny_mbeir, root)
    shutil.rmtree(root / "qrels" / "test")  # selection must not need them
    base, dirs = runs
    cfg = reranker_cfg(root, processor_dir)
    renderer = build.pair_renderer(Processor(processor_dir, cfg.data.processor), cfg.rerank)
    scorer = Scorer(model, cfg, renderer.yes_id, renderer.no_id)
    chosen = choose_weights(
        cfg, root, dirs["val"], TASKS, tmp_path / "out", renderer=renderer, scorer=scorer, checkpoint="tiny"
    )
    # independently: the grid value with the best val headline (ties: the smaller), from the saved P(yes)
    for task in TASKS:
        run = read_run(dirs["val"], task, TOP)
        saved = np.load(tmp_path / "out" / "scores" / "val" / f"{task}.npz")["p_yes"]
        offsets = np.cumsum([0] + [len(d) for d in run.dids])
        run.p_yes = [saved[offsets[i] : offsets[i + 1]].tolist() for i in range(len(run.dids))]
        positives = read_qrels(tiny_mbeir, "val", task).positives
        k = 5 if task != "fashioniq_task7" else 10
        best = None
        for w in sorted(cfg.rerank.weight_grid):
            hits = [
                any(d in positives[q] for d in ranked[:k]) for q, ranked in zip(run.qids, fused(run, w)[0], strict=True)
            ]
            value = 100.0 * np.mean(hits)
            if best is None or value > best[0]:
                best = (value, w)
        assert chosen[task] == best[1]
        assert select_weights({task: run}, positives, cfg.rerank.weight_grid)[task] == best[1]


def test_rerank_run_rescores_reorders_and_reports(runs, tiny_mbeir, processor_dir, model, tmp_path, capsys):
    from mmret.eval.rerank import rerank_run

    base, dirs = runs
    cfg = reranker_cfg(tiny_mbeir, processor_dir, weight=0.5)
    out = tmp_path / "out"
    report = rerank_run(cfg, out, model=model, checkpoint="tiny seed 3", retrieval=dirs["test"])
    processor = Processor(processor_dir, cfg.data.processor)
    renderer = PairRenderer(processor, UMARVEL)
    store = EvalStore(tiny_mbeir, "test", TASKS, ["local"], BadRecords("error"))
    for task in TASKS:
        before = read_trec(dirs["test"] / f"{task}.trec")
        after = read_trec(out / f"{task}.trec")
        saved = np.load(out / "scores" / f"{task}.npz")["p_yes"]
        positives = read_qrels(tiny_mbeir, "test", task).positives
        queries = {q.qid: q for q in store.task_queries[task]}
        i, hits_before, hits_after = 0, [], []
        for n, (qid, ranked) in enumerate(before.items()):
            top = ranked[:TOP]
            p_yes = saved[i : i + len(top)]
            i += len(top)
            if n < ALONE:  # P(yes) of each pair alone (an unpadded batch of one, eager)
                part = store.query_example(queries[qid], seed=0).query
                q_img = store.image(part.image, max_pixels=10**8) if part.image else None
                q_text = " ".join(t for t in (part.instruction, part.text) if t)
                alone = []
                for did, _ in top:
                    cand = store.candidate_part(did)
                    c_img = store.image(cand.image, max_pixels=10**8) if cand.image else None
                    pair = renderer(q_text, q_img, cand.text or "", c_img)
                    batch = collate_pairs(
                        [pair],
                        max_length=pair.example.length,
                        max_patches=max(4, pair.example.num_patches),
                        pad_token_id=processor.pad_token_id,
                        patch_dim=processor.patcher.patch_dim,
                    )
                    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
                    alone.append(float(model.score(arrays, renderer.yes_id, renderer.no_id)[0]))
                np.testing.assert_allclose(p_yes, alone, atol=1e-5)
            fused = [c + 0.5 * p for (_, c), p in zip(top, p_yes, strict=True)]
            order = np.argsort(-np.asarray(fused), kind="stable")
            assert [d for d, _ in after[qid]] == [top[j][0] for j in order]
            np.testing.assert_allclose([s for _, s in after[qid]], np.asarray(fused)[order], rtol=1e-6)
            hits_before.append(any(d in positives[qid] for d, _ in top[:5]))
            hits_after.append(any(d in positives[qid] for d, _ in after[qid][:5]))
        assert i == len(saved) == TOP * len(before)
        row = report["tasks"][task]
        assert row["weight"] == 0.5 and row["k"] == 5
        assert row["before"] == pytest.approx(100 * np.mean(hits_before))
        assert row["after"] == pytest.approx(100 * np.mean(hits_after))
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert "| **average** |" in (out / "report.md").read_text()
    # a rerun reuses every task's scores
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "scores").glob("*.npz")}
    capsys.readouterr()
    rerank_run(cfg, out, model=model, checkpoint="tiny seed 3", retrieval=dirs["test"])
    assert "rerank " not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "scores").glob("*.npz")} == mtimes


def test_a_missing_weight_needs_validation_lists(tiny_mbeir, processor_dir, model, tmp_path):
    from mmret.eval.rerank import rerank_run

    with pytest.raises(ValueError, match="rerank.select_on"):
        rerank_run(reranker_cfg(tiny_mbeir, processor_dir), tmp_path, model=model, checkpoint="x", retrieval=tmp_path)
    assert not Path(tmp_path / "report.json").exists()
