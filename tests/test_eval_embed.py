"""Embedding export and evaluation wiring: data-parallel embeddings equal single-example forwards,
shards resume, the global pool reuses local embeddings, and recall follows planted rankings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import eval_trainer_config

from mmret.data.bad_records import BadRecords
from mmret.data.mbeir import (
    EVAL_TASKS,
    candidate_text,
    query_text_parts,
    read_global_pool,
    read_local_pool,
    read_qrels,
    read_queries,
)
from mmret.data.processor import Processor
from mmret.eval import embed as embed_mod
from mmret.eval.config import EvalConfig
from mmret.eval.embed import Embeddings, embed, load_encoder, shard_name, write_json
from mmret.eval.evaluate import evaluate
from mmret.eval.index import SearchConfig
from mmret.eval.metrics import read_trec

TASKS = ("cirr_task7", "webqa_task1")  # (image, text) -> image and text -> text


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    from mmret.data.synthetic import write_synthetic_mbeir
    from mmret.models.qwen2_vl.processor_files import write_processor_files

    base = tmp_path_factory.mktemp("eval")
    write_processor_files(base / "proc")
    write_synthetic_mbeir(base / "mbeir", scale="tiny", seed=0)
    return {"base": base, "root": base / "mbeir", "proc": base / "proc"}


def trainer_cfg(env: dict, **eval_overrides):
    return eval_trainer_config(env["root"], env["proc"], TASKS, **eval_overrides)


@pytest.fixture(scope="module")
def embedded(env) -> Path:
    out = env["base"] / "emb"
    embed(trainer_cfg(env), out)
    return out


def test_sharded_embeddings_equal_single_example_forwards(env, embedded):
    """8 devices, batches of 8 with padding slots, shards of 40 vs one example at a time on the host."""
    assert len(jax.devices()) == 8
    cfg = trainer_cfg(env)
    emb = Embeddings(embedded)
    encoder = load_encoder(cfg)
    proc = Processor(env["proc"], cfg.data.processor)
    store = embed_mod.EvalStore(env["root"], "test", list(TASKS), ["local"], BadRecords("error"))

    def one(example) -> np.ndarray:
        batch = proc.collate([example], max_length=96, max_patches=64)
        return np.asarray(encoder({k: v for k, v in batch.items() if k != "valid"}))[0]

    qids, qv = emb.queries("cirr_task7")
    assert qids == [q.qid for q in read_queries(env["root"], "test", "cirr_task7")]
    for row in (0, len(qids) - 1):
        q = store.task_queries["cirr_task7"][row]
        instruction, text = query_text_parts(q, store.instructions, seed=0)
        image = store.image(q.image_path, max_pixels=10**8)
        ref = one(proc(text=text, image=image, instruction=instruction))
        np.testing.assert_allclose(qv[row].astype(np.float32), ref, atol=2e-3)
    dids, cv = emb.local_pool("webqa_task1")
    assert dids == list(read_local_pool(env["root"], "webqa_task1"))
    assert cv.dtype == np.float16 and cv.shape == (len(dids), 64) and len(dids) > 40  # several shards
    for row in (0, 41, len(dids) - 1):
        cand = store.candidate(dids[row])  # the pool holds wrong-modality distractors too
        image = None if cand.image_path is None else store.image(cand.image_path, max_pixels=10**8)
        ref = one(proc(text=candidate_text(cand) or None, image=image))
        np.testing.assert_allclose(cv[row].astype(np.float32), ref, atol=2e-3)


def test_rerun_redoes_only_missing_shards(env, embedded, tmp_path):
    out = tmp_path / "emb"
    for p in embedded.rglob("*"):  # a copy of a finished run
        if p.is_file():
            (out / p.relative_to(embedded)).parent.mkdir(parents=True, exist_ok=True)
            (out / p.relative_to(embedded)).write_bytes(p.read_bytes())
    pool_dir = out / "pools" / "local" / "webqa_task1"
    kept, lost = pool_dir / shard_name(0), pool_dir / shard_name(1)
    os.utime(kept, (1, 1))
    lost.unlink()
    with pytest.raises(FileNotFoundError, match="1 of .* shards missing"):
        Embeddings(out).local_pool("webqa_task1")
    calls = []
    original = embed_mod.Embedder.__call__
    embed_mod.Embedder.__call__ = lambda self, b: calls.append(1) or original(self, b)
    try:
        embed(trainer_cfg(env), out)
    finally:
        embed_mod.Embedder.__call__ = original
    assert kept.stat().st_mtime == 1  # untouched
    assert len(calls) == 5  # the lost shard's 40 items in batches of 8, nothing else
    a, b = Embeddings(embedded).local_pool("webqa_task1"), Embeddings(out).local_pool("webqa_task1")
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_interrupted_run_completes_to_the_same_embeddings(env, embedded, tmp_path):
    out = tmp_path / "emb"
    original = embed_mod.Embedder.__call__
    calls = []

    def dying(self, batch):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt("killed")
        return original(self, batch)

    embed_mod.Embedder.__call__ = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            embed(trainer_cfg(env), out)
    finally:
        embed_mod.Embedder.__call__ = original
    assert not list(out.rglob(".*tmp*"))  # no half-written shard
    embed(trainer_cfg(env), out)
    for task in TASKS:
        for group in (f"queries/{task}", f"pools/local/{task}"):
            a, b = Embeddings(embedded).group(group), Embeddings(out).group(group)
            assert a[0] == b[0]
            np.testing.assert_array_equal(a[1], b[1])


def test_other_settings_refuse_the_directory(env, embedded, tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "embeddings.json").write_bytes((embedded / "embeddings.json").read_bytes())
    with pytest.raises(ValueError, match="instruction_seed"):
        embed(trainer_cfg(env, instruction_seed=1), out)


def test_global_pool_reuses_local_embeddings(env, tmp_path):
    """The union pool plus one candidate found in no local pool: only that one is embedded anew."""
    root = tmp_path / "mbeir"
    for p in env["root"].rglob("*"):
        target = root / p.relative_to(env["root"])
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:  # copies: a symlink out of the root is refused (images.py)
            target.write_bytes(p.read_bytes())
    union = root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"
    extra = {"did": "2:999999", "txt": "An extra passage.", "img_path": None, "modality": "text", "src_content": None}
    union.write_text(union.read_text() + json.dumps(extra) + "\n")
    cfg = trainer_cfg(env, root=str(root), pools=["global"], shard_size=4096)
    calls = []
    original = embed_mod.Embedder.__call__
    embed_mod.Embedder.__call__ = lambda self, b: calls.append(1) or original(self, b)
    try:
        embed(cfg, tmp_path / "emb")
    finally:
        embed_mod.Embedder.__call__ = original
    emb = Embeddings(tmp_path / "emb")
    members, vectors = emb.global_pool()
    assert members == list(read_global_pool(root))
    local_total = sum(len(read_local_pool(root, t)) for t in EVAL_TASKS)
    assert len(members) == local_total + 1
    assert emb.group("pools/global/extra")[0] == ["2:999999"]
    dids, local = emb.local_pool("webqa_task1")
    np.testing.assert_array_equal(vectors[members.index(dids[3])], local[3])
    # Batches: queries of the 2 tasks + 16 local pools + 1 extra, each group in batches of 8 (no group twice).
    expected = sum(-(-len(read_queries(root, "test", t)) // 8) for t in TASKS)
    expected += sum(-(-len(read_local_pool(root, t)) // 8) for t in EVAL_TASKS) + 1
    assert len(calls) == expected


def planted(env: dict, tmp_path: Path) -> Path:
    """An embeddings directory whose vectors plant a known ranking: cirr queries point at their first
    positive (R@1 = 100), webqa queries at a candidate that is not a positive (R@10 = 0)."""
    rng = np.random.default_rng(0)
    out = tmp_path / "planted"
    write_json(out / "embeddings.json", {"split": "test", "dim": 32, "tasks": list(TASKS), "source": {"preset": "x"}})
    qrels = {
        **read_qrels(env["root"], "test", "cirr_task7").positives,
        **read_qrels(env["root"], "test", "webqa_task1").positives,
    }
    for task in TASKS:
        dids = list(read_local_pool(env["root"], task))
        vectors = rng.normal(size=(len(dids), 32))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        qids = [q.qid for q in read_queries(env["root"], "test", task)]
        if task == "cirr_task7":
            target = [dids.index(qrels[q][0]) for q in qids]
        else:
            target = [next(i for i, d in enumerate(dids) if d not in qrels[q]) for q in qids]
        for name, ids, vec in ((f"queries/{task}", qids, vectors[target]), (f"pools/local/{task}", dids, vectors)):
            write_json(out / name / "group.json", {"count": len(ids), "shards": 1})
            np.savez(out / name / shard_name(0), embeddings=vec.astype(np.float16), ids=np.asarray(ids))
    return out


def test_recall_follows_a_planted_ranking(env, tmp_path):
    report = evaluate(planted(env, tmp_path), env["root"], "local", tmp_path / "out", top=5)
    cirr, webqa = report["tasks"]["cirr_task7"], report["tasks"]["webqa_task1"]
    assert cirr["recall@1"] == 100.0 and cirr["num_queries"] == 24
    assert webqa["recall@1"] == 0.0  # its top hit is a non-positive; other positives may follow
    run = read_trec(tmp_path / "out" / "cirr_task7.trec")
    qrels = read_qrels(env["root"], "test", "cirr_task7").positives
    assert len(run) == 24 and all(len(r) == 5 and r[0][0] == qrels[q][0] for q, r in run.items())
    assert report["average"] == pytest.approx((100.0 + webqa["recall@5"]) / 2)
    assert report["extra"]["indexes"] == {"cirr_task7": "ExactIndex", "webqa_task1": "ExactIndex"}


def test_scann_path_and_check_exact(env, tmp_path, capsys):
    search = SearchConfig(method="scann", num_leaves=4, num_leaves_to_search=4, training_sample_size=200)
    report = evaluate(
        planted(env, tmp_path), env["root"], "local", tmp_path / "out", search=search, check_exact_queries=10
    )
    assert report["tasks"]["cirr_task7"]["recall@1"] == 100.0  # all leaves searched, reordered exactly
    assert set(report["extra"]["scann_recall@10_vs_exact"]) == set(TASKS)
    assert "check_exact cirr_task7: ScaNN recall@10 against exact search" in capsys.readouterr().out


def test_eval_config_errors_name_the_key():
    with pytest.raises(ValueError, match="eval.pools"):
        EvalConfig(pools=("local", "union"))
    with pytest.raises(ValueError, match="eval.shard_size"):
        EvalConfig(shard_size=0)


def test_scann_eval_tool_writes_the_report(env, tmp_path, capsys):
    from helpers import load_tool

    tool = load_tool("scann_eval")
    emb = planted(env, tmp_path)
    args = ["--embeddings", str(emb), "--mbeir_root", str(env["root"]), "--pool", "local", "--out"]
    assert tool.main([*args, str(tmp_path / "out"), "--method", "exact"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tasks"]["cirr_task7"]["recall@1"] == 100.0 and report["pool"] == "local"
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cirr_task7 | 24 | 100.0 |" in capsys.readouterr().out
    assert tool.main([*args, str(tmp_path / "out2"), "--tasks", "nights_task4"]) == 1
    assert "nights_task4 was not embedded" in capsys.readouterr().err
