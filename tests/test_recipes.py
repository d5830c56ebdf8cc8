"""Every shipped recipe's demo preset runs end to end from its config, shortened: U-MARVEL's chain (text,
caption, M-BEIR, mining, hard negatives), MM-Embed's (in-batch, modality-aware mining, hard negatives from
the base model, continual fine-tuning on a BEIR mix) and JFE's (adaptation on a caption + NLI mix,
instruction tuning). One step per stage on the tiny random model (preset), the session's tiny corpora,
through the entry point (one simulated device each, one after the other), on two M-BEIR tasks; the last
stage is evaluated on their local pools."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest

from mmret import chain
from mmret.data.mbeir import read_queries
from mmret.data.negatives import read_negatives
from mmret.recipe import as_trainer_config

REPO = Path(__file__).resolve().parents[1]
TASKS = ["mscoco_task0", "cirr_task7"]  # trained, mined and evaluated


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from mmret.data.synthetic.pairs import write_synthetic_pairs

    root = tmp_path_factory.mktemp("pairs") / "pairs"
    write_synthetic_pairs(root, scale="tiny", seed=0)
    return root


def short(recipe: str, mbeir: Path, pairs: Path, proc: Path) -> dict:
    """``configs/<recipe>.py:demo`` on the tiny data: 1 step per stage, batches of 8, no GradCache, the
    paths of the demo redirected, the last stage evaluated (2 tasks) and no other."""
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", REPO / "configs" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("demo").to_dict()
    c["model"] = {**c["model"], "hf_dir": None, "preset": "tiny", "seed": 0}
    c["data"] = {**c["data"], "root": str(mbeir), "processor_dir": str(proc), "tasks": TASKS}
    c["eval"] = {**c["eval"], "root": str(mbeir), "tasks": TASKS, "pools": ["local"], "at_start": False}
    c["eval"].update(batch_size=8, max_patches=8 * 64, shard_size=64, at_end=False)
    c["log_every"], c["checkpoint"] = 1, {"every": 1, "keep": 1, "async_save": False}
    last = list(c["stages"])[-1]
    for name, stage in c["stages"].items():
        o = stage.setdefault("overrides", {})
        o["optimizer"] = {**o.get("optimizer", {}), "total_steps": 1}
        o["grad_cache_chunk"] = None
        data = o.setdefault("data", {})
        if "root" in data:  # the demo's /tmp paths -> the test's corpora
            data["root"] = str(pairs / Path(data["root"]).name) if "pairs" in data["root"] else str(mbeir)
        for source in data.get("mix", {}).values():
            source["root"] = str(pairs / Path(source["root"]).name) if "pairs" in source["root"] else str(mbeir)
            if source.get("layout", "mbeir") == "mbeir":
                source["tasks"] = TASKS
        if "mining" in o:  # a top 10 of the two tasks' local pools (the chain mines the tasks the stage trains on)
            o["mining"] = {
                **o["mining"],
                "pool": "local",
                "top_k": 10,
                "modality_top": 10,
                "rank_cut": 5,
                "negatives": 2,
            }
        if o.get("task") == "distill":  # half the training queries, lists of 4
            o["distill"] = {**o.get("distill", {}), "fraction": 0.5, "top_k": 4}
        pipeline = data.setdefault("pipeline", {})
        n = 4 if o.get("task") == "distill" else 1 + pipeline.get("num_negatives", 0)
        pipeline.update(batch_size=8, max_query_patches=8 * 64, max_candidate_patches=8 * n * 64, grad_cache_chunk=None)
        if pipeline.get("num_negatives"):
            pipeline["num_negatives"] = 2
        o["eval"] = {**o.get("eval", {}), "at_start": False, "at_end": name == last}
    c["stages"] = [{"name": name, **stage} for name, stage in c["stages"].items()]  # JSON keeps a list's order
    return c


CONFIG_PY = """import json
import ml_collections


def get_config(arg=None):
    return ml_collections.ConfigDict(json.loads({text!r}))
"""
RECIPES = ["umarvel", "mmembed", "jfe"]


@pytest.fixture(scope="module")
def runs(tiny_mbeir, pairs, processor_dir, tmp_path_factory) -> dict:
    """Each recipe's short chain through the entry point, the three at once (one simulated device each)."""
    base = tmp_path_factory.mktemp("recipes")
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=helpers.xla_flags(1),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    commands, cfgs = [], {}
    for recipe in RECIPES:
        c = short(recipe, tiny_mbeir, pairs, processor_dir)
        cfgs[recipe] = as_trainer_config(c)
        config_file = base / f"{recipe}_short.py"
        config_file.write_text(CONFIG_PY.format(text=json.dumps(c)))
        commands.append([sys.executable, "-m", "mmret.launch", f"--config={config_file}", f"--workdir={base / recipe}"])
    # One after the other: the later recipes read the stages' programs the first compiled from the session's
    # compilation cache (the three at once would each compile them, twice the CPU on the suite's two cores).
    results = [subprocess.run(c, capture_output=True, text=True, timeout=600, env=env, cwd=REPO) for c in commands]
    return {r: (base / r, cfgs[r], res) for r, res in zip(RECIPES, results, strict=True)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_demo_runs_end_to_end(recipe, runs):
    workdir, cfg, result = runs[recipe]
    assert result.returncode == 0, result.stderr[-3000:]
    names = [s.name for s in cfg.stages]
    records = [chain.done(workdir, n) for n in names]
    assert all(r is not None for r in records), records
    for r in records:
        assert r["final_step"] == 1 and not r["preempted"] and np.isfinite(r["loss"]), r
    last = records[-1]
    assert set(last["eval"]) == {"local"} and 0 <= last["eval"]["local"] <= 100
    for s in cfg.stages:  # every stage that mines trained on the file its miner wrote
        if s.mine_from:
            scfg = chain.stage_config(cfg, s.name, workdir)
            negatives = read_negatives(scfg.data.negatives_file)
            assert negatives and all(len(v) == scfg.mining.negatives for v in negatives.values())
            summary = json.loads((Path(scfg.data.negatives_file).parent / "summary.json").read_text())
            assert summary["rule"] == scfg.mining.rule and summary["tasks"] == TASKS
    assert all(f"=== stage {n} ===" in result.stdout for n in names)
    assert all(f"| {n} | 1 |" in result.stdout for n in names)  # the closing table
    # started again in this process: nothing is redone
    assert chain.run_chain(cfg, workdir) == records


def test_umarvels_distillation_teacher_is_the_retrievers_local_top_k_rescored_by_its_reranker(runs, tiny_mbeir):
    """Stage 5's lists: each sampled training query's exact top 4 of its task's local pool under the hardneg
    model's embeddings, with the reranker's P(yes) as the rerank mode cached it, fused with U-MARVEL's w."""
    from mmret.eval.embed import Embeddings

    workdir, cfg, result = runs["umarvel"]
    assert result.returncode == 0, result.stderr[-3000:]
    scfg = chain.stage_config(cfg, "distill", workdir)
    out = Path(scfg.distill.teacher_file).parent
    records = [json.loads(line) for line in Path(scfg.distill.teacher_file).read_text().splitlines()]
    emb = Embeddings(out / "embeddings")
    assert emb.manifest["source"]["workdir"] == str(workdir / "hardneg")  # the init_from stage retrieves
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reranker"].startswith(str(workdir / "reranker"))
    for task in TASKS:
        rows = [r for r in records if r["task"] == task]
        train = {q.qid for q in read_queries(tiny_mbeir, "train", task)}
        assert rows and {r["qid"] for r in rows} <= train and len(rows) < len(train)  # a sample of the queries
        qids, q = emb.queries(task)
        ids, c = emb.local_pool(task)
        scores = q.astype(np.float64) @ c.astype(np.float64).T
        cache = np.load(out / "scores" / f"{task}.npz")["p_yes"]
        flat = []
        w = 0.5 if task == "mscoco_task0" else 1.0  # U-MARVEL's per-task teacher weights
        for r in rows:
            s = scores[qids.index(r["qid"])]
            top = np.argsort(-s, kind="stable")[:4]
            assert r["dids"] == [ids[j] for j in top]
            np.testing.assert_allclose(r["cosine"], s[top], atol=2e-3)
            np.testing.assert_allclose(r["fused"], np.asarray(r["cosine"]) + w * np.asarray(r["p_yes"]), atol=2e-6)
            assert all(0.0 < p < 1.0 for p in r["p_yes"])
            flat += r["p_yes"]
        np.testing.assert_allclose(flat, cache, atol=1e-6)  # the rerank mode's scores of these lists
    metrics = [json.loads(line) for line in (workdir / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in m and np.isfinite(m["kl"]) for m in metrics)


def test_the_chains_reranker_and_a_zero_shot_one_rerank_the_distilled_retrievers_run(runs, tiny_mbeir, tmp_path):
    """``--mode=rerank`` through the entry point from the configs: the U-MARVEL chain's trained reranker stage
    (w = 1) and MM-Embed's zero-shot preset (the untrained model, True/False, P(True) alone) rerank the distilled
    retriever's local runs of the two tasks (top 3); each writes the reranked TREC files and its report."""
    from mmret.eval.metrics import read_trec
    from mmret.recipe import config_to_json

    workdir, cfg, result = runs["umarvel"]
    assert result.returncode == 0, result.stderr[-3000:]
    retrieval = workdir / "distill" / "eval" / "1" / "local"
    c = config_to_json(cfg)  # the chain's config, the reranker stage's run to rerank with
    c["rerank"] = {**c["rerank"], "retrieval": str(retrieval), "weight": 1.0, "top_k": 3}
    (tmp_path / "rerank.py").write_text(CONFIG_PY.format(text=json.dumps(c)))
    assert helpers.load_tool("make_tiny_model").main(["--out", str(tmp_path / "model")]) == 0
    env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(1), JAX_PLATFORMS="cpu")
    launch = [sys.executable, "-m", "mmret.launch"]
    trained = [
        *launch,
        f"--config={tmp_path / 'rerank.py'}",
        f"--workdir={workdir}",
        "--stage=reranker",
        "--mode=rerank",
    ]
    zero_shot = [
        *launch,
        "--config=configs/mmembed.py:zeroshot_demo",
        f"--workdir={tmp_path / 'zs'}",
        "--mode=rerank",
        "--step=0",
        f"--config.model.hf_dir={tmp_path / 'model'}",
        f"--config.data.root={tiny_mbeir}",
        f"--config.rerank.retrieval={retrieval}",
        f"--config.eval.tasks={tuple(TASKS)!r}",
        "--config.rerank.top_k=3",
    ]
    results = helpers.run_at_once(trained, zero_shot, env=env, cwd=REPO)
    outs = [
        workdir / "reranker" / "rerank" / str(chain.done(workdir, "reranker")["final_step"]),
        tmp_path / "zs" / "rerank" / "0",
    ]
    for r, out, prompt in zip(results, outs, ["umarvel", "mmembed"], strict=True):
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert set(report["tasks"]) == set(TASKS) and report["prompt"] == prompt and report["top_k"] == 3
        assert "| **average** |" in r.stdout
        for task in TASKS:
            before, after = read_trec(retrieval / f"{task}.trec"), read_trec(out / f"{task}.trec")
            assert set(after) == set(before)  # every query, its top 3 reordered
            assert all(sorted(d for d, _ in after[q]) == sorted(d for d, _ in before[q][:3]) for q in before)


def test_the_chains_trained_reranker_exports_to_transformers(runs, tmp_path):
    """The U-MARVEL chain's reranker stage (trained a step from the preset) exports to a directory that
    transformers loads with no missing or unexpected keys, and its P(yes) there equals the trained run's."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from mmret.build import pair_renderer, processor_dir
    from mmret.checkpoints import load_trained_reranker, run_config
    from mmret.data.processor import Processor
    from mmret.data.rerank_pairs import collate_pairs
    from mmret.export import export_run

    workdir, _, result = runs["umarvel"]
    assert result.returncode == 0, result.stderr[-3000:]
    run = workdir / "reranker"
    out = export_run(run, tmp_path / "export")
    meta = json.loads((out / "mmret_reranker.json").read_text())
    hf, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    cfg = run_config(run)
    proc = Processor(processor_dir(cfg), cfg.data.processor)
    pair = pair_renderer(proc, cfg.rerank)("Find a photo of a red circle.", None, "A red circle.", None)
    batch = collate_pairs(
        [pair],
        max_length=pair.example.length,
        max_patches=8,
        pad_token_id=proc.pad_token_id,
        patch_dim=proc.patcher.patch_dim,
    )
    yes, no = meta["yes_token_id"], meta["no_token_id"]
    trained = float(np.asarray(load_trained_reranker(cfg, run, 1).score(batch, yes, no))[0])
    with torch.no_grad():
        logits = hf.eval()(input_ids=torch.tensor(pair.example.input_ids[None], dtype=torch.long)).logits[0, -1]
    ref = torch.softmax(logits[[yes, no]], dim=0)[0].item()
    assert abs(ref - trained) < 1e-4
