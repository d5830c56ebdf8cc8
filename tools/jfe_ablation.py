#!/usr/bin/env python
"""JFE's ablation: train joint and late fusion on the same data, print the gain of joint over late.

    python tools/jfe_ablation.py --workdir DIR [--preset demo] [--set key=value ...]

Runs the chain of ``configs/jfe.py[:preset]`` twice, in ``DIR/joint`` and ``DIR/late``, identical but for
``encoder.fusion`` (every stage evaluated at its end), then prints and writes ``DIR/ablation.md``: per pool
and per task the final stage's headline recall of each, the gain (joint - late), and the gain per group:
the tasks whose query or candidate holds both modalities (M-BEIR tasks 2, 6, 7, 8: JFE's claim is that the
gain is largest there) and the rest. ``--set key=value`` overrides a config field in both runs (the value
read as JSON when it parses, else as a string), e.g. ``--set optimizer.total_steps=50``. A restarted
ablation resumes each run where it stopped (:mod:`mmret.chain`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

FUSIONS = ("joint", "late")
#: M-BEIR task ids whose query or candidate holds both modalities.
BOTH_MODALITIES = frozenset({2, 6, 7, 8})


def load_config(preset: str | None, overrides: Sequence[str], fusion: str) -> Any:
    """``configs/jfe.py[:preset]`` with ``overrides`` (``key=value``) and ``encoder.fusion=fusion``."""
    spec = importlib.util.spec_from_file_location("jfe_config", _REPO_ROOT / "configs" / "jfe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(preset)
    c.unlock()
    for item in ["eval.at_end=true", *overrides, f"encoder.fusion={fusion}"]:  # the final stage's reports
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def group_of(task: str) -> str:
    """``"both"`` for a task whose query or candidate holds both modalities, else ``"rest"``."""
    return "both" if int(task.rsplit("task", 1)[1]) in BOTH_MODALITIES else "rest"


def gains(joint: Mapping[str, Any], late: Mapping[str, Any]) -> dict[str, Any]:
    """Per task and per group, the headline recall of both reports and the gain of joint over late."""
    tasks = [t for t in joint["tasks"] if t in late["tasks"]]
    rows = {t: (joint["tasks"][t]["headline"], late["tasks"][t]["headline"]) for t in tasks}
    out: dict[str, Any] = {"tasks": {t: {"joint": j, "late": la, "gain": j - la} for t, (j, la) in rows.items()}}
    for group in ("both", "rest"):
        members = [t for t in tasks if group_of(t) == group]
        if members:
            j = sum(rows[t][0] for t in members) / len(members)
            la = sum(rows[t][1] for t in members) / len(members)
            out[group] = {"tasks": len(members), "joint": j, "late": la, "gain": j - la}
    return out


def table(pool: str, result: Mapping[str, Any]) -> str:
    lines = [f"\n{pool} pool (final stage, headline recall):\n", "| task | joint | late | gain |", "|---|---|---|---|"]
    for t, r in result["tasks"].items():
        lines.append(f"| {t} | {r['joint']:.1f} | {r['late']:.1f} | {r['gain']:+.1f} |")
    names = {"both": "query or candidate with both modalities (tasks 2, 6, 7, 8)", "rest": "the rest"}
    for group in ("both", "rest"):
        if group in result:
            g = result[group]
            lines.append(
                f"| **{names[group]}**, {g['tasks']} tasks | {g['joint']:.1f} | {g['late']:.1f} | "
                f"**{g['gain']:+.1f}** |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train JFE's joint and late fusion on the same data; print the gain.")
    parser.add_argument("--workdir", required=True, type=Path, help="DIR/joint and DIR/late are the two chains")
    parser.add_argument("--preset", default=None, help="configs/jfe.py preset (e.g. demo); default: the paper's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, for both runs")
    args = parser.parse_args(argv)

    from mmret import chain
    from mmret.eval.report import read_report
    from mmret.eval.run import eval_dir
    from mmret.recipe import as_trainer_config

    reports: dict[str, dict[str, Any]] = {}
    for fusion in FUSIONS:
        cfg = as_trainer_config(load_config(args.preset, args.overrides, fusion))
        if not cfg.stages:
            raise ValueError("configs/jfe.py gave no stages")
        last = cfg.stages[-1].name
        workdir = args.workdir / fusion
        print(f"\n##### {fusion} fusion -> {workdir}", flush=True)
        records = chain.run_chain(cfg, workdir)
        if records[-1]["preempted"]:
            print(f"{fusion}: preempted; start the ablation again to resume", flush=True)
            return 1
        final = records[-1]["final_step"]
        reports[fusion] = {
            pool: read_report(eval_dir(chain.stage_dir(workdir, last), final) / pool) for pool in cfg.eval.pools
        }
    parts = [f"# JFE ablation: joint vs late fusion ({args.workdir})"]
    results = {}
    for pool in reports["joint"]:
        results[pool] = gains(reports["joint"][pool], reports["late"][pool])
        parts.append(table(pool, results[pool]))
    text = "\n".join(parts) + "\n"
    print(text, flush=True)
    (args.workdir / "ablation.md").write_text(text)
    (args.workdir / "ablation.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
