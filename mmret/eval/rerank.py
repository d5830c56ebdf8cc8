"""Reranking a retrieval run: the reranker rescores each query's top ``rerank.top_k`` of a run's TREC files
(``<task>.trec``, as :func:`mmret.eval.evaluate.evaluate` writes them: cosine scores), the fused score
``cosine + w * P(yes)`` reorders them, and the reranked TREC files and a before / after report are written.

``rerank.cosine=False`` orders by ``w * P(yes)`` alone (MM-Embed's zero-shot reranking of its top 10).
``w`` (``rerank.weight``): one value for every task, or None to choose it per task on validation data:
``rerank.select_on`` names a retrieval run of the validation queries (``--mode=eval`` with
``eval.split=val``); each task takes the grid value (``rerank.weight_grid``, smallest first, ties to the
smaller) with the best headline recall there. The test split's qrels are read only to report, never to choose.

Scoring is data-parallel over every device and host (each global batch is every host's block of pairs,
scores gathered to all), in batches of ``rerank.batch_size`` pairs per host, and resumable per task: a
task's P(yes) array is written to ``scores/<task>.npz`` when it is complete, with the key it depends on
(the reranker checkpoint, the prompt and shapes, the TREC file's size and time); a rerun reuses it.

Layout of the output directory::

    <task>.trec          the reranked top_k (score: the fused score)
    scores/<task>.npz    qids, dids, cosine and P(yes) of the rescored pairs (+ scores/val/ for select_on)
    report.json          per task: headline recall before and after, w, Recall@1/5/10 before / after
    report.md            the same as a table
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from mmret import build, sharding
from mmret.atomic_dir import PathLike, absolute, as_path, write_atomic
from mmret.data import packing
from mmret.data.bad_records import BadRecords
from mmret.data.mbeir import dataset_task
from mmret.data.processor import Processor
from mmret.data.rerank_pairs import PairRenderer, collate_pairs, query_text
from mmret.data.stores import EvalStore
from mmret.eval.evaluate import positives_for
from mmret.eval.metrics import evaluate_task, read_trec, write_trec
from mmret.models.reranker import Reranker
from mmret.progress import progress
from mmret.recipe import TrainerConfig

SCORES = "scores"
REPORT = "report.json"


@dataclasses.dataclass
class Run:
    """One task's rescored lists: per query its top-k dids and cosines (best first) and their P(yes)."""

    task: str
    qids: list[str]
    dids: list[list[str]]
    cosine: list[list[float]]
    p_yes: list[list[float]] | None = None


def read_run(retrieval: PathLike, task: str, top_k: int) -> Run:
    """The top ``top_k`` of each query of ``retrieval/<task>.trec``."""
    path = as_path(retrieval) / f"{task}.trec"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no TREC file of task {task} in the retrieval run")
    runs = read_trec(path)
    qids = list(runs)
    dids = [[d for d, _ in runs[q][:top_k]] for q in qids]
    return Run(task, qids, dids, [[s for _, s in runs[q][:top_k]] for q in qids])


def fused(run: Run, weight: float, *, cosine: bool = True) -> tuple[list[list[str]], list[list[float]]]:
    """Each query's candidates reordered by ``cosine + weight * P(yes)`` (``cosine=False``: ``weight * P(yes)``;
    descending; ties keep the retrieval order), with those scores."""
    out_dids, out_scores = [], []
    for dids, cos, p in zip(run.dids, run.cosine, run.p_yes, strict=True):
        score = [(c if cosine else 0.0) + weight * y for c, y in zip(cos, p, strict=True)]
        order = sorted(range(len(dids)), key=lambda i: -score[i])  # sorted is stable
        out_dids.append([dids[i] for i in order])
        out_scores.append([score[i] for i in order])
    return out_dids, out_scores


def select_weights(
    runs: Mapping[str, Run], positives: Mapping[str, Sequence[str]], grid: Sequence[float], *, cosine: bool = True
) -> dict[str, float]:
    """Per task the grid value whose fused ranking has the best headline recall on ``runs`` (validation
    lists with their P(yes)); ties go to the smaller value."""
    chosen = {}
    for task, run in runs.items():
        best = None
        for w in sorted(grid):
            headline = evaluate_task(task, run.qids, fused(run, w, cosine=cosine)[0], positives).headline
            if best is None or headline > best[0]:
                best = (headline, w)
        chosen[task] = best[1]
    return chosen


class Scorer:
    """The jitted, data-parallel P(yes) of a reranker on a mesh."""

    def __init__(self, model: Reranker, cfg: TrainerConfig, yes_id: int, no_id: int):
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.rules = sharding.make_rules(overrides=cfg.rules)
        with jax.set_mesh(self.mesh), sharding.axis_rules(self.rules):
            sharding.place_model(model, self.mesh, self.rules)
        graphdef, self.state = nnx.split(model)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        def score(state: nnx.State, batch: dict[str, Any]) -> jax.Array:
            return nnx.merge(graphdef, state).score(batch, yes_id, no_id)

        self._fn = jax.jit(score, out_shardings=replicated)

    def __call__(self, host_batch: dict[str, Any]) -> jax.Array:
        arrays = {k: v for k, v in host_batch.items() if k != "meta"}
        if packing.is_packed(arrays):  # every process's block takes the most rows any needs
            arrays = packing.globalize(arrays)
        with jax.set_mesh(self.mesh), sharding.axis_rules(self.rules):
            return self._fn(self.state, sharding.put_batch(arrays, self.mesh, self.rules))


def score_run(run: Run, store: EvalStore, renderer: PairRenderer, scorer: Scorer, cfg: TrainerConfig) -> None:
    """Set ``run.p_yes``: P(yes) of every (query, candidate) pair. Each host renders its contiguous part of
    the pairs; a global batch is every host's block; the scores come back to every host."""
    rcfg, ecfg = cfg.rerank, cfg.eval
    processor = renderer.processor
    queries = {q.qid: q for q in store.task_queries[run.task]}
    items = [(qid, did) for qid, dids in zip(run.qids, run.dids, strict=True) for did in dids]
    flat = np.zeros(len(items), np.float64)
    hosts, me, batch = jax.process_count(), jax.process_index(), rcfg.batch_size
    per = math.ceil(len(items) / hosts)
    mine = items[me * per : (me + 1) * per]
    query_inputs: dict[str, tuple[str, Any]] = {}

    def image(key: str | None) -> Any:
        return store.image(key, max_pixels=ecfg.max_decode_pixels) if key else None

    def pair(item: tuple[str, str]) -> Any:
        qid, did = item
        if qid not in query_inputs:
            part = store.query_example(queries[qid], seed=ecfg.instruction_seed).query
            query_inputs[qid] = (query_text(part.instruction, part.text), image(part.image))
        cand = store.candidate_part(did)
        return renderer(*query_inputs[qid], cand.text or "", image(cand.image))

    bar = progress(len(items), f"rerank {run.task}", unit="pair", out=sys.stdout, disable=me != 0)
    for b in range(max(1, math.ceil(per / batch)) if items else 0):
        pairs = [pair(it) for it in mine[b * batch : (b + 1) * batch]]
        pairs += [pairs[0] if pairs else pair(items[0])] * (batch - len(pairs))  # padding slots
        host_batch = collate_pairs(
            pairs,
            max_length=rcfg.max_length,
            max_patches=rcfg.max_patches,
            max_targets=1,
            pad_token_id=processor.pad_token_id,
            patch_dim=processor.patcher.patch_dim,
            packing=rcfg.packing,
        )
        scores = np.asarray(scorer(host_batch).addressable_data(0)).reshape(hosts, batch)
        for h in range(hosts):
            begin = h * per + b * batch
            end = min((h + 1) * per, len(items), begin + batch)
            if end > begin:
                flat[begin:end] = scores[h, : end - begin]
                bar.update(end - begin)
    bar.close()
    run.p_yes = per_query(flat, run.dids)


def per_query(flat: Sequence[float], dids: Sequence[Sequence[str]]) -> list[list[float]]:
    """A flat array of pair scores cut back into each query's list (as long as its ``dids``)."""
    offsets = np.cumsum([0, *(len(d) for d in dids)])
    return [np.asarray(flat[offsets[i] : offsets[i + 1]]).tolist() for i in range(len(dids))]


def scores_key(cfg: TrainerConfig, trec: epath.Path, checkpoint: str) -> dict[str, Any]:
    """What a task's P(yes) array depends on (cheap: file stats)."""
    stat = trec.stat()
    r = cfg.rerank
    return {
        "trec": absolute(trec),
        "size": stat.length,
        "mtime": stat.mtime,
        "checkpoint": checkpoint,
        "rerank": {k: getattr(r, k) for k in ("prompt", "top_k", "max_text_tokens", "max_length")},
        "instruction_seed": cfg.eval.instruction_seed,
    }


def scored_run(
    cfg: TrainerConfig,
    retrieval: PathLike,
    task: str,
    out: epath.Path,
    *,
    store: EvalStore,
    renderer: PairRenderer,
    scorer: Scorer,
    checkpoint: str,
) -> Run:
    """``task``'s run from ``retrieval`` with its P(yes), reused from ``out/<task>.npz`` when its key matches."""
    run = read_run(retrieval, task, cfg.rerank.top_k)
    key = json.loads(json.dumps(scores_key(cfg, as_path(retrieval) / f"{task}.trec", checkpoint)))
    cache = out / f"{task}.npz"
    if cache.is_file():
        with cache.open("rb") as f:
            saved = np.load(f, allow_pickle=False)
            if json.loads(str(saved["key"])) == key:
                run.p_yes = per_query(saved["p_yes"], run.dids)
                return run
    score_run(run, store, renderer, scorer, cfg)
    if jax.process_index() == 0:
        flat = np.asarray([p for row in run.p_yes for p in row], np.float64)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, lambda f: np.savez(f, p_yes=flat, key=np.asarray(json.dumps(key))))
    return run


def choose_weights(
    cfg: TrainerConfig,
    root: PathLike,
    select_on: PathLike,
    tasks: Sequence[str],
    out: epath.Path,
    *,
    renderer: PairRenderer,
    scorer: Scorer,
    checkpoint: str,
) -> dict[str, float]:
    """Per task the ``rerank.weight_grid`` value best on the validation run ``select_on`` (its lists rescored
    into ``out/scores/val/``); reads the validation queries and qrels only."""
    store = EvalStore(root, "val", tasks, ["local"], BadRecords(cfg.eval.on_bad_record))
    runs = {
        t: scored_run(
            cfg,
            select_on,
            t,
            out / SCORES / "val",
            store=store,
            renderer=renderer,
            scorer=scorer,
            checkpoint=checkpoint,
        )
        for t in tasks
    }
    return select_weights(runs, positives_for(root, "val", tasks), cfg.rerank.weight_grid, cosine=cfg.rerank.cosine)


def rerank_run(
    cfg: TrainerConfig,
    out: PathLike,
    *,
    model: Reranker,
    checkpoint: str,
    retrieval: PathLike,
    select_on: PathLike | None = None,
) -> dict[str, Any]:
    """Rerank ``retrieval`` (a directory of ``<task>.trec`` files of ``eval.split``) with ``model`` into
    ``out`` (see the module docstring); returns the report. ``checkpoint`` names the reranker (reports,
    cache keys)."""
    rcfg, ecfg = cfg.rerank, cfg.eval
    root = ecfg.root or cfg.data.root
    if not root:
        raise ValueError("eval.root: no M-BEIR root given (nor data.root)")
    if rcfg.weight is None and select_on is None:
        raise ValueError("rerank.weight=None chooses w on validation lists: give rerank.select_on (or a weight)")
    out = as_path(out)
    retrieval_report = (
        json.loads((as_path(retrieval) / REPORT).read_text()) if (as_path(retrieval) / REPORT).is_file() else {}
    )
    tasks = [dataset_task(t).name for t in (ecfg.tasks or list(retrieval_report.get("tasks", {})))]
    if not tasks:
        raise ValueError(f"{retrieval}: no report.json naming its tasks; give eval.tasks")
    processor = Processor(build.processor_dir(cfg), cfg.data.processor)
    renderer = build.pair_renderer(processor, rcfg)
    scorer = Scorer(model, cfg, renderer.yes_id, renderer.no_id)
    if rcfg.weight is None:
        weights = choose_weights(
            cfg, root, select_on, tasks, out, renderer=renderer, scorer=scorer, checkpoint=checkpoint
        )
    else:
        weights = {t: float(rcfg.weight) for t in tasks}
    pool = retrieval_report.get("pool", "local")  # the pool the lists were retrieved from
    store = EvalStore(root, ecfg.split, tasks, [pool], BadRecords(ecfg.on_bad_record))
    positives = positives_for(root, ecfg.split, tasks)
    rows: dict[str, Any] = {}
    for task in tasks:
        run = scored_run(
            cfg, retrieval, task, out / SCORES, store=store, renderer=renderer, scorer=scorer, checkpoint=checkpoint
        )
        dids, scores = fused(run, weights[task], cosine=rcfg.cosine)
        before, after = (evaluate_task(task, run.qids, ranked, positives) for ranked in (run.dids, dids))
        if jax.process_index() == 0:
            write_trec(out / f"{task}.trec", run.qids, dids, scores, tag="mmret-rerank", top=rcfg.top_k)
        rows[task] = {
            "k": before.headline_k,
            "before": before.headline,
            "after": after.headline,
            "weight": weights[task],
            "recall_before": before.recall,
            "recall_after": after.recall,
            "queries": len(run.qids),
        }
    report = {
        "retrieval": absolute(retrieval),
        "select_on": absolute(select_on) if select_on is not None else None,
        "reranker": checkpoint,
        "prompt": rcfg.prompt,
        "pool": pool,
        "top_k": rcfg.top_k,
        "split": ecfg.split,
        "tasks": rows,
        "average_before": float(np.mean([r["before"] for r in rows.values()])),
        "average_after": float(np.mean([r["after"] for r in rows.values()])),
    }
    if jax.process_index() == 0:
        write_atomic(out / REPORT, (json.dumps(report, indent=1) + "\n").encode())
        write_atomic(out / "report.md", markdown(report).encode())
    return report


def markdown(report: Mapping[str, Any]) -> str:
    """The report as a table: per task k, headline recall before and after, the change, w."""
    lines = [
        f"# Reranked: top {report['top_k']} of {report['retrieval']} with {report['reranker']} "
        f"(prompt {report['prompt']})",
        "",
        "| task | k | before | after | change | w |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for task, r in report["tasks"].items():
        lines.append(
            f"| {task} | {r['k']} | {r['before']:.1f} | {r['after']:.1f} | {r['after'] - r['before']:+.1f} "
            f"| {r['weight']:g} |"
        )
    b, a = report["average_before"], report["average_after"]
    lines.append(f"| **average** | | {b:.1f} | {a:.1f} | {a - b:+.1f} | |")
    w_from = "chosen per task on " + str(report["select_on"]) if report["select_on"] else "given"
    return "\n".join(lines) + f"\n\nw: {w_from}.\n"
