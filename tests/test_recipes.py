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
        pipeline = data.setdefault("pipeline", {})
        n = 1 + pipeline.get("num_negatives", 0)
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
