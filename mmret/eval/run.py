"""Evaluate a training run's checkpoint end to end: embed, then search and report every pool.

    <workdir>/eval/<step>/embeddings/     the embeddings (mmret.eval.embed; resumable)
    <workdir>/eval/<step>/<pool>/         TREC runs and report.{json,md,png} (mmret.eval.evaluate)

Step 0 is the model the run starts from (before training). A pool's report is reused only when its
``fingerprint`` equals what this evaluation would depend on (:func:`mmret.eval.evaluate.report_key`: the
embeddings' key, which covers the model, the settings, the M-BEIR root and the size and mtime of its
record files, plus the qrels files and the search settings); otherwise it is redone, and embeddings
whose key changed are recomputed (:func:`mmret.eval.embed.embed`). A global-pool report without the
wrong-modality shares (written before they existed) is redone too, on the same embeddings. An interrupted
evaluation picks up where it stopped. A missing root or record file is an error before anything is reused.
"""

from __future__ import annotations

from typing import Any

import jax
from etils import epath

from mmret.atomic_dir import PathLike, as_path
from mmret.checkpoints import resolve_step
from mmret.eval.embed import embed, embed_key, eval_root
from mmret.eval.evaluate import evaluate, report_key
from mmret.eval.report import compare_table, read_report, search_summary
from mmret.recipe import TrainerConfig

REPORT = "report.json"
#: The report's average wrong-modality share (global pool).
WRONG_MODALITY = "wrong_modality_average"


def eval_dir(workdir: PathLike, step: int, split: str = "test") -> epath.Path:
    """``<workdir>/eval/<step>``: the embeddings and reports of a run's checkpoint ``step`` on the test
    split; ``<workdir>/eval/<split>/<step>`` on another (a validation run beside the test one)."""
    base = as_path(workdir) / "eval"
    return base / str(step) if split == "test" else base / split / str(step)


def evaluate_run(cfg: TrainerConfig, workdir: PathLike, step: int | None = None) -> dict[str, dict[str, Any]]:
    """Reports (pool -> report dict) of the run's checkpoint ``step`` (None: the latest; 0: before
    training) on ``cfg.eval.pools``. Embedding runs on every process; search on the primary one."""
    ecfg = cfg.eval
    step = resolve_step(workdir, step)
    out = eval_dir(workdir, step, ecfg.split)
    root = eval_root(cfg, ecfg)
    key = embed_key(cfg, ecfg, workdir=workdir, step=step)  # raises for a missing root or record file
    todo = [p for p in ecfg.pools if not _reusable(out / p, report_key_for(key, root, p, ecfg))]
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
                    pages=ecfg.pages,
                )
            else:
                reports[pool] = read_report(out / pool)
            r = reports[pool]
            note = "" if pool in todo else " (reused: nothing it depends on changed)"
            bias = "" if r.get(WRONG_MODALITY) is None else f", wrong modality {r[WRONG_MODALITY]:.1f}%"
            print(
                f"eval step {step}, {pool} pool: average {r['average']:.1f}{bias}, {search_summary(r)} search "
                f"-> {out / pool}{note}",
                flush=True,
            )
    return reports


def report_key_for(key: dict[str, Any], root: str, pool: str, ecfg: Any) -> dict[str, Any]:
    """The fingerprint a report of ``pool`` made now would record (``key``: the embeddings' key)."""
    return report_key(
        key, root, pool, key["tasks"], search=ecfg.search, top=ecfg.top, check_exact_queries=ecfg.check_exact
    )


def _reusable(pool_dir: epath.Path, fingerprint: dict[str, Any]) -> bool:
    """Whether the report in ``pool_dir`` was made from exactly what ``fingerprint`` names (and, on the
    global pool, has the wrong-modality shares)."""
    if not (pool_dir / REPORT).is_file():
        return False
    report = read_report(pool_dir)
    if fingerprint.get("pool") == "global" and WRONG_MODALITY not in report:
        return False
    return report.get("fingerprint") == fingerprint


def before_after(workdir: PathLike, before: int, after: int, pools: tuple[str, ...]) -> str:
    """Markdown before/after tables (one per pool) from the written reports; on the global pool with the
    wrong-modality shares before and after (lower is better; "n/a" for a report without them)."""
    parts = []
    for pool in pools:
        a, b = read_report(eval_dir(workdir, before) / pool), read_report(eval_dir(workdir, after) / pool)
        parts.append(f"\n{pool} pool, step {before} -> step {after}:\n")
        parts.append(compare_table(a, b, labels=(f"step {before}", f"step {after}")))
    return "\n".join(parts)
