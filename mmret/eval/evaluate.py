"""Search embedded pools and score them: embeddings directory + M-BEIR root -> TREC runs and a report.

``local``: every task's queries against its own pool (one index per task). ``global``: every task's
queries against the union pool (one index). Positives come from each task's qrels file, all of them
counted (:func:`mmret.eval.metrics.evaluate_task`).

    python tools/scann_eval.py --embeddings DIR --mbeir_root ROOT --pool local|global --out OUT
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmret.data.mbeir import dataset_task, read_qrels
from mmret.eval.config import POOLS
from mmret.eval.embed import Embeddings
from mmret.eval.index import SearchConfig, build_index, check_exact
from mmret.eval.metrics import TaskResult, evaluate_task, write_trec
from mmret.eval.report import write_report

log = logging.getLogger("mmret.eval")

#: Neighbours retrieved per query: enough for Recall@10 and the TREC files.
MIN_DEPTH = 10


def positives_for(root: str | Path, split: str, tasks: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """qid -> positive dids from the qrels files of the tasks (one file per dataset-task)."""
    out: dict[str, tuple[str, ...]] = {}
    for task in tasks:
        out.update(read_qrels(root, split, task).positives)
    return out


def checkpoint_label(manifest: dict[str, Any]) -> str:
    """Where the embedded model came from, as one string (report.json's ``checkpoint``)."""
    source = manifest.get("source", {})
    if "workdir" in source:
        step = source["step"]
        return f"{source['workdir']}/checkpoints/{step}" if step else f"{source['workdir']} (step 0, before training)"
    for key in ("checkpoint", "hf_dir"):
        if source.get(key):
            return str(source[key])
    return f"preset {source.get('preset')} (seed {source.get('seed')})"


def _rankings(ids: Sequence[str], neighbours: np.ndarray) -> list[list[str]]:
    return [[ids[j] for j in row if j >= 0] for row in neighbours]


def evaluate(
    embeddings: str | Path,
    mbeir_root: str | Path,
    pool: str,
    out: str | Path,
    *,
    search: SearchConfig | None = None,
    top: int = 50,
    check_exact_queries: int = 0,
    tasks: Sequence[str] | None = None,
    tag: str = "mmret",
) -> dict[str, Any]:
    """Search, score and report one pool; returns the report (as written to ``out/report.json``)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be 'local' or 'global', got {pool!r}")
    search = SearchConfig() if search is None else search
    emb = Embeddings(embeddings)
    tasks = [dataset_task(t).name for t in (tasks or emb.tasks)]
    missing = [t for t in tasks if t not in emb.tasks]
    if missing:
        raise ValueError(f"{embeddings}: task {missing[0]} was not embedded (have: {', '.join(emb.tasks)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    positives = positives_for(mbeir_root, emb.manifest["split"], tasks)
    depth = max(top, MIN_DEPTH)
    started = time.perf_counter()
    results: dict[str, TaskResult] = {}
    exact_recall: dict[str, float] = {}
    indexes: dict[str, str] = {}

    def run(name: str, index: Any, vectors: np.ndarray, ids: list[str], task_list: list[str]) -> None:
        indexes[name] = type(index).__name__
        queries = {t: emb.queries(t) for t in task_list}  # read once: check_exact and the search share them
        if check_exact_queries and type(index).__name__ != "ExactIndex":
            q = np.concatenate([v for _, v in queries.values()]).astype(np.float32)
            exact_recall[name] = check_exact(index, vectors, q, check_exact_queries, k=10)
            print(f"check_exact {name}: ScaNN recall@10 against exact search = {exact_recall[name]:.4f}", flush=True)
        for task, (qids, q) in queries.items():
            neighbours, scores = index.search(q.astype(np.float32), depth)
            ranked = _rankings(ids, neighbours)
            cut = [s[: len(r)] for s, r in zip(scores, ranked, strict=True)]
            write_trec(out / f"{task}.trec", qids, ranked, cut, tag=tag, top=top)
            results[task] = evaluate_task(task, qids, ranked, positives)

    if pool == "local":
        for task in tasks:
            ids, vectors = emb.local_pool(task)
            vectors = vectors.astype(np.float32)
            run(task, build_index(vectors, search, k=depth), vectors, ids, [task])
    else:
        ids, vectors = emb.global_pool()
        vectors = vectors.astype(np.float32)
        run("global", build_index(vectors, search, k=depth), vectors, ids, tasks)
    extra: dict[str, Any] = {
        "embeddings": str(Path(embeddings).absolute()),
        "indexes": indexes,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if exact_recall:
        extra["scann_recall@10_vs_exact"] = exact_recall
    return write_report(
        out,
        results=results,
        mbeir_root=str(mbeir_root),
        pool=pool,
        checkpoint=checkpoint_label(emb.manifest),
        extra=extra,
    )
