"""Evaluate a training run's checkpoint end to end: embed, then search and report every pool.

    <workdir>/eval/<step>/embeddings/     the embeddings (mmret.eval.embed; resumable)
    <workdir>/eval/<step>/<pool>/         TREC runs and report.{json,md,png} (mmret.eval.evaluate)

Step 0 is the model the run starts from (before training). A pool whose report exists is not redone,
so an interrupted evaluation picks up where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from mmret.eval.embed import embed, resolve_step
from mmret.eval.evaluate import evaluate
from mmret.eval.report import compare_table, read_report
from mmret.train.trainer import TrainerConfig

REPORT = "report.json"


def eval_dir(workdir: str | Path, step: int) -> Path:
    return Path(workdir) / "eval" / str(step)


def evaluate_run(cfg: TrainerConfig, workdir: str | Path, step: int | None = None) -> dict[str, dict[str, Any]]:
    """Reports (pool -> report dict) of the run's checkpoint ``step`` (None: the latest; 0: before
    training) on ``cfg.eval.pools``. Embedding runs on every process; search on the primary one."""
    ecfg = cfg.eval
    step = resolve_step(workdir, step)
    out = eval_dir(workdir, step)
    root = ecfg.root or cfg.data.root
    todo = [p for p in ecfg.pools if not (out / p / REPORT).is_file()]
    if todo:
        embed(cfg, out / "embeddings", ecfg, workdir=workdir, step=step)
    reports: dict[str, dict[str, Any]] = {}
    if jax.process_index() == 0:
        for pool in ecfg.pools:
            if pool in todo:
                reports[pool] = evaluate(
                    out / "embeddings",
                    root,
                    pool,
                    out / pool,
                    search=ecfg.search,
                    top=ecfg.top,
                    check_exact_queries=ecfg.check_exact,
                    tasks=ecfg.tasks,
                )
            else:
                reports[pool] = read_report(out / pool)
            print(f"eval step {step}, {pool} pool: average {reports[pool]['average']:.1f} -> {out / pool}", flush=True)
    return reports


def before_after(workdir: str | Path, before: int, after: int, pools: tuple[str, ...]) -> str:
    """Markdown before/after tables (one per pool) from the written reports."""
    parts = []
    for pool in pools:
        a, b = read_report(eval_dir(workdir, before) / pool), read_report(eval_dir(workdir, after) / pool)
        parts.append(f"\n{pool} pool, step {before} -> step {after}:\n")
        parts.append(compare_table(a, b, labels=(f"step {before}", f"step {after}")))
    return "\n".join(parts)
