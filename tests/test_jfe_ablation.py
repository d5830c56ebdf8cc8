"""tools/jfe_ablation.py: the per-task and per-group gain of joint over late fusion, and its config knobs."""

from __future__ import annotations

import pytest
from helpers import load_tool

from mmret.recipe import as_trainer_config

ablation = load_tool("jfe_ablation")


def report(headlines: dict[str, float]) -> dict:
    return {"tasks": {t: {"headline": h} for t, h in headlines.items()}}


def test_gain_per_task_and_per_group():
    joint = report({"webqa_task2": 40.0, "cirr_task7": 30.0, "mscoco_task0": 50.0, "nights_task4": 10.0})
    late = report({"webqa_task2": 30.0, "cirr_task7": 26.0, "mscoco_task0": 49.0, "nights_task4": 12.0})
    out = ablation.gains(joint, late)
    assert out["tasks"]["webqa_task2"] == {"joint": 40.0, "late": 30.0, "gain": 10.0}
    assert out["tasks"]["nights_task4"]["gain"] == -2.0
    # tasks 2 and 7 hold both modalities on one side; 0 and 4 do not
    assert out["both"] == {"tasks": 2, "joint": 35.0, "late": 28.0, "gain": 7.0}
    assert out["rest"] == {"tasks": 2, "joint": 30.0, "late": 30.5, "gain": -0.5}
    text = ablation.table("global", out)
    assert "| webqa_task2 | 40.0 | 30.0 | +10.0 |" in text and "**+7.0**" in text and "**-0.5**" in text


@pytest.mark.parametrize("task, group", [("oven_task6", "both"), ("infoseek_task8", "both"), ("webqa_task1", "rest")])
def test_groups_follow_the_task_id(task, group):
    assert ablation.group_of(task) == group


def test_the_two_runs_differ_only_in_fusion_and_evaluate_their_last_stage():
    joint, late = (
        as_trainer_config(ablation.load_config("demo", ["optimizer.total_steps=7"], f)) for f in ("joint", "late")
    )
    assert (joint.encoder.fusion, late.encoder.fusion) == ("joint", "late")
    assert joint.optimizer.total_steps == late.optimizer.total_steps == 7 and joint.eval.at_end
    assert joint.stages == late.stages and [s.name for s in joint.stages] == ["adapt", "instruct"]
    with pytest.raises(ValueError, match="expected key=value"):
        ablation.load_config("demo", ["optimizer.total_steps"], "joint")
