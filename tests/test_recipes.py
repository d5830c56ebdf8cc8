"""Every shipped recipe's demo preset runs end to end from its config, shortened: U-MARVEL's chain (text,
caption, M-BEIR, mining, hard negatives), MM-Embed's (in-batch, modality-aware mining, hard negatives from
the base model, continual fine-tuning on a BEIR mix) and JFE's (adaptation on a caption + NLI mix,
instruction tuning). One step per stage on the tiny random model (preset), the session's tiny corpora,
in this process (8 simulated devices), on two M-BEIR tasks; the last stage is evaluated on their local
pools."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
    return c


@pytest.mark.parametrize("recipe", ["umarvel", "mmembed", "jfe"])
def test_recipe_demo_runs_end_to_end(recipe, tiny_mbeir, pairs, processor_dir, tmp_path, capsys):
    cfg = as_trainer_config(short(recipe, tiny_mbeir, pairs, processor_dir))
    records = chain.run_chain(cfg, tmp_path)
    names = [s.name for s in cfg.stages]
    assert [r["stage"] for r in records] == names
    for r in records:
        assert r["final_step"] == 1 and not r["preempted"] and np.isfinite(r["loss"]), r
        assert chain.done(tmp_path, r["stage"]) == json.loads(json.dumps(r))
    last = records[-1]
    assert set(last["eval"]) == {"local"} and 0 <= last["eval"]["local"] <= 100
    for s in cfg.stages:  # every stage that mines trained on the file its miner wrote
        if s.mine_from:
            scfg = chain.stage_config(cfg, s.name, tmp_path)
            negatives = read_negatives(scfg.data.negatives_file)
            assert negatives and all(len(v) == scfg.mining.negatives for v in negatives.values())
            summary = json.loads((Path(scfg.data.negatives_file).parent / "summary.json").read_text())
            assert summary["rule"] == scfg.mining.rule and summary["tasks"] == TASKS
    out = capsys.readouterr().out
    assert all(f"=== stage {n} ===" in out for n in names)
    table = chain.chain_table(records, ("local",))
    assert all(f"| {n} | 1 |" in table for n in names)
    # started again: nothing is redone
    again = chain.run_chain(cfg, tmp_path)
    assert again == [json.loads(json.dumps(r)) for r in records]
    assert all(f"stage {n}: finished at step 1, skipped" in capsys.readouterr().out for n in names[-1:])
