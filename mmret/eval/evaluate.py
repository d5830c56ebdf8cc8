"""Search embedded pools and score them: embeddings directory + M-BEIR root -> TREC runs and a report.

``local``: every task's queries against its own pool (one index per task). ``global``: every task's
queries against the union pool (one index). Positives come from each task's qrels file, all of them
counted (:func:`mmret.eval.metrics.evaluate_task`). On the global pool each task also gets its
modality bias (:func:`mmret.eval.metrics.wrong_modality_share` at the headline k: the percent of the top
k whose modality is not the task's target modality), the candidates' modalities read from the union pool
file (only the retrieved ones are kept; nothing is embedded again).

The report names the search of each index (``report["search"]``: exact, or ScaNN with its resolved
parameters) and, for ScaNN with ``check_exact_queries`` > 0, its agreement with exact search on the
reported metric: per task, on that many sampled queries, the headline Recall@k of the ScaNN ranking
minus that of the exact ranking (points), and the neighbour recall@10; without a sample the report
says the agreement was not measured. ``report["fingerprint"]`` is what the numbers depend on
(:func:`report_key`): ``mmret.eval.run`` reuses a report only when it is unchanged. Test queries the
embedding skipped (``eval.on_bad_record="skip"``) are listed and make the report not complete.

    python tools/scann_eval.py --embeddings DIR --mbeir_root ROOT --pool local|global --out OUT
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from mmret.atomic_dir import PathLike, absolute, as_path
from mmret.data.bad_records import BadRecords
from mmret.data.mbeir import dataset_task, global_pool_path, iter_jsonl, qrels_path, read_qrels
from mmret.eval.embed import Embeddings, file_stamps, key_of
from mmret.eval.index import ExactIndex, ScannIndex, build_index, exact_search, recall_against_exact
from mmret.eval.metrics import TaskResult, evaluate_task, hits_at_k, write_trec, wrong_modality_share
from mmret.eval.pages import write_pages
from mmret.eval.report import write_report
from mmret.recipe import POOLS, SearchConfig

log = logging.getLogger("mmret.eval")

#: Neighbours retrieved per query: enough for Recall@10 and the TREC files.
MIN_DEPTH = 10
#: Hits per query on the HTML pages (:mod:`mmret.eval.pages`).
PAGE_TOP = 5


def positives_for(root: PathLike, split: str, tasks: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """qid -> positive dids from the qrels files of the tasks (one file per dataset-task)."""
    out: dict[str, tuple[str, ...]] = {}
    for task in tasks:
        out.update(read_qrels(root, split, task).positives)
    return out


def candidate_modalities(path: PathLike, dids: Collection[str]) -> dict[str, str]:
    """``did -> modality`` of the candidates ``dids`` in a pool file (the first line of a did wins, as in
    :func:`mmret.data.mbeir.read_pool`). Lines that do not decode are passed over: the embedding already
    checked the file, and what it dropped was never embedded, so never retrieved."""
    out: dict[str, str] = {}
    for _, obj in iter_jsonl(path, BadRecords("skip")):
        did = obj.get("did")
        if isinstance(did, str) and did in dids and did not in out:
            out[did] = obj.get("modality")
    return out


def with_modality_bias(
    results: dict[str, TaskResult], tops: Mapping[str, list[list[str]]], pool_file: PathLike
) -> dict[str, TaskResult]:
    """``results`` with each task's wrong-modality share at its headline k (``tops``: task -> each
    query's first k retrieved dids), the modalities read from ``pool_file``."""
    modality = candidate_modalities(pool_file, {d for top in tops.values() for row in top for d in row})
    out = dict(results)
    for task, top in tops.items():
        t = dataset_task(task)
        share = wrong_modality_share(top, t.cand_modality, modality, t.recall_k)
        out[task] = dataclasses.replace(results[task], wrong_modality=share)
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


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values that compare equal after a round trip (tuples as lists, a NaN float
    as the string ``"NaN"``: report.json allows no NaN, and NaN != NaN)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return "NaN"
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    return obj


def report_key(
    embeddings_key: Mapping[str, Any],
    mbeir_root: PathLike,
    pool: str,
    tasks: Sequence[str],
    *,
    search: SearchConfig,
    top: int,
    check_exact_queries: int,
) -> dict[str, Any]:
    """What a report's numbers depend on: the embeddings' key (:func:`mmret.eval.embed.embed_key`), the
    qrels files read (size and mtime_ns), the pool, the tasks and the search settings."""
    split = embeddings_key["split"]
    return jsonable(
        {
            "embeddings": embeddings_key,
            "mbeir_root": absolute(mbeir_root),
            "qrels_files": file_stamps(mbeir_root, [qrels_path(mbeir_root, split, t) for t in tasks]),
            "pool": pool,
            "tasks": list(tasks),
            "search": search,
            "top": top,
            "check_exact": check_exact_queries,
        }
    )


def agreement(
    task: str,
    qids: Sequence[str],
    queries: np.ndarray,
    approx: Sequence[Sequence[str]],
    approx_ids: np.ndarray,
    vectors: np.ndarray,
    ids: Sequence[str],
    positives: Mapping[str, Sequence[str]],
    n: int,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The approximate search against exact search on ``n`` of a task's queries (seeded sample, all when
    fewer): Recall@k (the task's headline k, percent) of the approximate rankings ``approx`` (rows of
    ``approx_ids``) and of exact rankings, their difference (approximate - exact, points), and the
    neighbour recall@10 (mean top-10 overlap)."""
    k = dataset_task(task).recall_k
    rng = np.random.default_rng(seed)
    rows = np.arange(len(qids)) if n >= len(qids) else np.sort(rng.choice(len(qids), size=n, replace=False))
    exact_ids, _ = exact_search(queries[rows], vectors, max(k, 10))
    exact = _rankings(ids, exact_ids)
    pos = [positives[qids[r]] for r in rows]
    r_approx = 100.0 * float(hits_at_k([approx[r] for r in rows], pos, k).mean())
    r_exact = 100.0 * float(hits_at_k(exact, pos, k).mean())
    return {
        "k": k,
        "queries": len(rows),
        "recall_scann": r_approx,
        "recall_exact": r_exact,
        "difference": r_approx - r_exact,
        "neighbour_recall@10": recall_against_exact(approx_ids[rows], exact_ids, 10),
    }


def search_info(index: ExactIndex | ScannIndex) -> dict[str, Any]:
    """The search an index does, for the report: ``{"method": "exact"}`` or ScaNN with its parameters."""
    if isinstance(index, ScannIndex):
        return {"method": "scann", "params": jsonable(index.params)}
    return {"method": "exact"}


def evaluate(
    embeddings: PathLike,
    mbeir_root: PathLike,
    pool: str,
    out: PathLike,
    *,
    search: SearchConfig | None = None,
    top: int = 50,
    check_exact_queries: int = 0,
    tasks: Sequence[str] | None = None,
    tag: str = "mmret",
    pages: int = 0,
) -> dict[str, Any]:
    """Search, score and report one pool; returns the report (as written to ``out/report.json``). ``pages``:
    queries shown per task in the HTML pages ``out/<task>.html`` (:mod:`mmret.eval.pages`; 0: none)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be 'local' or 'global', got {pool!r}")
    search = SearchConfig() if search is None else search
    emb = Embeddings(embeddings)
    tasks = [dataset_task(t).name for t in (tasks or emb.tasks)]
    missing = [t for t in tasks if t not in emb.tasks]
    if missing:
        raise ValueError(f"{embeddings}: task {missing[0]} was not embedded (have: {', '.join(emb.tasks)})")
    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    positives = positives_for(mbeir_root, emb.manifest["split"], tasks)
    fingerprint = report_key(
        key_of(emb.manifest), mbeir_root, pool, tasks, search=search, top=top, check_exact_queries=check_exact_queries
    )
    depth = max(top, MIN_DEPTH)
    started = time.perf_counter()
    results: dict[str, TaskResult] = {}
    searches: dict[str, dict[str, Any]] = {}
    tops: dict[str, list[list[str]]] = {}  # the global pool's top k per query, for the modality bias
    shown: dict[str, tuple[list[str], list[list[str]], list[Any]]] = {}  # for the pages

    def run(name: str, index: Any, vectors: np.ndarray, ids: list[str], task_list: list[str]) -> None:
        info = searches[name] = search_info(index)
        if info["method"] != "exact":
            info["agreement"] = {} if check_exact_queries else None
        for task in task_list:
            qids, q = emb.queries(task)
            q = q.astype(np.float32)
            neighbours, scores = index.search(q, depth)
            ranked = _rankings(ids, neighbours)
            cut = [s[: len(r)] for s, r in zip(scores, ranked, strict=True)]
            write_trec(out / f"{task}.trec", qids, ranked, cut, tag=tag, top=top)
            if pages:
                shown[task] = (qids, [r[:PAGE_TOP] for r in ranked], [c[:PAGE_TOP].tolist() for c in cut])
            results[task] = evaluate_task(task, qids, ranked, positives)
            if pool == "global":
                tops[task] = [r[: dataset_task(task).recall_k] for r in ranked]
            if info.get("agreement") is not None:
                a = info["agreement"][task] = agreement(
                    task, qids, q, ranked, neighbours, vectors, ids, positives, check_exact_queries
                )
                print(
                    f"check_exact {name} {task}: R@{a['k']} ScaNN {a['recall_scann']:.1f} - exact "
                    f"{a['recall_exact']:.1f} = {a['difference']:+.1f} on {a['queries']} queries; "
                    f"neighbour recall@10 {a['neighbour_recall@10']:.4f}",
                    flush=True,
                )

    if pool == "local":
        for task in tasks:
            ids, vectors = emb.local_pool(task)
            vectors = vectors.astype(np.float32)
            run(task, build_index(vectors, search, k=depth), vectors, ids, [task])
    else:
        ids, vectors = emb.global_pool()
        vectors = vectors.astype(np.float32)
        run("global", build_index(vectors, search, k=depth), vectors, ids, tasks)
        results = with_modality_bias(results, tops, global_pool_path(mbeir_root, emb.manifest["split"]))
    write_pages(out, mbeir_root, emb.manifest["split"], pool, shown, positives, queries_per_task=pages, top=PAGE_TOP)
    skipped = emb.manifest.get("skipped") or {}
    skipped = {
        **({"queries": q} if (q := {t: v for t, v in skipped.get("queries", {}).items() if t in tasks}) else {}),
        **({"other_records": skipped["other_records"]} if "other_records" in skipped else {}),
    }
    extra: dict[str, Any] = {
        "embeddings": absolute(embeddings),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return write_report(
        out,
        results=results,
        mbeir_root=str(mbeir_root),
        pool=pool,
        checkpoint=checkpoint_label(emb.manifest),
        search=searches,
        check_exact=check_exact_queries,
        skipped=skipped,
        fingerprint=fingerprint,
        extra=extra,
    )
