"""Mine hard negatives with a run's checkpoint: embed, search, pick (:mod:`mmret.mining.rules`), write.

``mine(cfg, out, workdir=RUN, step=N)`` (settings: ``cfg.mining``, :class:`mmret.recipe.MiningConfig`):

1. Embed (:func:`mmret.eval.embed.embed`, resumable, data-parallel over every device of every host) the
   ``mining.split`` queries of each task, each qid once (the per-task query files, not the up-sampled
   union file), and the pool: ``global``, the split's union pool
   (``cand_pool/global/mbeir_union_<split>_cand_pool.jsonl``), or ``local``, each task's own pool; into
   ``out/embeddings``.
2. On the primary process: search each task's queries for the top ``mining.top_k`` (``eval.search``: exact
   or ScaNN, as evaluation searches), then apply the rule to each query with its record's whole
   ``pos_cand_list`` as positives, the task's target modality, the false-negative filter
   (:mod:`mmret.mining.false_negatives`, ``mining.false_negative_filter``) and a random generator of
   ``(mining.seed, qid)``.
3. Write, atomically: ``out/negatives.jsonl`` (one line per qid: ``qid``, ``neg_cand_list``, and the
   ``ranks``, ``scores`` and ``kinds`` of its negatives; :mod:`mmret.data.negatives`, what
   ``data.negatives_file`` reads) and ``out/summary.json`` (counts per kind, modality histograms per task
   and overall, fallback queries, false negatives filtered, the rule and its settings, and ``key``).

Reuse: ``key`` is the embeddings' key (:func:`mmret.eval.embed.embed_key`: model, step, data files, ...) with
the mining and search settings; a rerun with the same key returns the existing file without loading
anything, another key mines again (the embeddings themselves are reused or recomputed by their own key).

    python tools/mine.py --workdir RUN [--step N] [--out DIR] [--rule mmembed] [--negatives 5]
    python -m mmret.launch --config=... --workdir=RUN --mode=mine
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from mmret.atomic_dir import PathLike, absolute, as_path, write_atomic
from mmret.checkpoints import resolve_step
from mmret.data.bad_records import BadRecords
from mmret.data.images import load_image
from mmret.data.mbeir import (
    EVAL_TASKS,
    Candidate,
    dataset_task,
    query_path,
    read_global_pool,
    read_local_pool,
    read_queries,
)
from mmret.data.negatives import write_negatives
from mmret.eval.embed import GROUP, Embeddings, embed, embed_key
from mmret.eval.evaluate import search_info
from mmret.eval.index import build_index
from mmret.mining import rules
from mmret.mining.false_negatives import ContentKeys
from mmret.multihost import primary_says, sync
from mmret.progress import format_duration, progress
from mmret.recipe import EvalConfig, MiningConfig, TrainerConfig, config_to_json

NEGATIVES = "negatives.jsonl"
SUMMARY = "summary.json"
EMBEDDINGS = "embeddings"
KEY_VERSION = 1

#: Queries searched per call (bounds the result arrays; the rules then run row by row).
_SEARCH_BLOCK = 8192


# ================================================================================================ setup


def mining_root(cfg: TrainerConfig, mcfg: MiningConfig) -> str:
    root = mcfg.root or cfg.data.root
    if not root:
        raise ValueError("mining.root: no M-BEIR root given (nor data.root)")
    return root


def mining_tasks(root: PathLike, mcfg: MiningConfig) -> list[str]:
    """``mining.tasks`` (names checked), or every dataset-task with a query file of ``mining.split``."""
    if mcfg.tasks is not None:
        return [dataset_task(t).name for t in mcfg.tasks]
    tasks = [t.name for t in EVAL_TASKS if query_path(root, mcfg.split, t).is_file()]
    if not tasks:
        raise FileNotFoundError(f"{as_path(root) / 'query' / mcfg.split}: no {mcfg.split} query files to mine")
    return tasks


def mining_eval_config(cfg: TrainerConfig, mcfg: MiningConfig, root: str, tasks: Sequence[str]) -> EvalConfig:
    """The embedding settings of a mining run: ``eval``'s batch shapes and search, mining's data."""
    return dataclasses.replace(
        cfg.eval,
        root=root,
        split=mcfg.split,
        tasks=tuple(tasks),
        pools=(mcfg.pool,),
        on_bad_record=mcfg.on_bad_record,
        check_exact=0,
        at_start=False,
        at_end=False,
    )


def mining_key(
    cfg: TrainerConfig, mcfg: MiningConfig, ecfg: EvalConfig, *, workdir: PathLike | None, step: int
) -> dict[str, Any]:
    """What a negatives file depends on (file stats only, cheap)."""
    key = {
        "version": KEY_VERSION,
        "embeddings": embed_key(cfg, ecfg, workdir=workdir, step=step),
        "mining": {**config_to_json(mcfg), "root": absolute(ecfg.root or ""), "tasks": list(ecfg.tasks or ())},
        "search": config_to_json(cfg.eval.search),
    }
    return json.loads(json.dumps(key))


def reusable(out: epath.Path, key: Mapping[str, Any]) -> bool:
    """Whether ``out`` holds a negatives file mined under ``key``."""
    summary = out / SUMMARY
    if not (summary.is_file() and (out / NEGATIVES).is_file()):
        return False
    try:
        return json.loads(summary.read_text()).get("key") == key
    except (json.JSONDecodeError, AttributeError):
        return False


# ============================================================================================== mining


@dataclasses.dataclass
class Tally:
    """Counts for the summary, per task and overall."""

    queries: int = 0
    kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    modalities: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fallback: int = 0  # queries with a random negative
    short: int = 0  # queries with fewer than n negatives (a pool too small)

    def add(self, negatives: Sequence[rules.Negative], n: int, modality_of: Callable[[str], str]) -> None:
        self.queries += 1
        self.kinds.update(x.kind for x in negatives)
        self.modalities.update(modality_of(x.did) for x in negatives)
        self.fallback += any(x.kind == rules.RANDOM for x in negatives)
        self.short += len(negatives) < n

    def as_json(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "negatives": sum(self.kinds.values()),
            "kinds": {k: self.kinds[k] for k in rules.KINDS if self.kinds[k]},
            "modalities": dict(sorted(self.modalities.items())),
            "fallback_queries": self.fallback,
            "short_queries": self.short,
        }


def pick(
    mcfg: MiningConfig,
    ranked: Sequence[str],
    scores: Sequence[float],
    *,
    qid: str,
    positives: Sequence[str],
    target_modality: str,
    modality_of: Callable[[str], str],
    pool: Sequence[str],
    is_false_negative: Callable[[str], bool],
) -> list[rules.Negative]:
    """``mcfg.rule`` applied to one query's ranking."""
    rng = rules.query_rng(mcfg.seed, qid)
    fallback = pool if mcfg.random_fallback else ()  # an empty pool: no random fill
    common = dict(
        positives=set(positives), n=mcfg.negatives, pool=fallback, rng=rng, is_false_negative=is_false_negative
    )
    if mcfg.rule == "umarvel":
        return rules.umarvel(ranked, scores, **common)
    return rules.mmembed(
        ranked,
        scores,
        target_modality=target_modality,
        modality_of=modality_of,
        modality_top=mcfg.modality_top,
        rank_cut=mcfg.rank_cut,
        modality_share=mcfg.modality_share,
        **common,
    )


def _record(qid: str, negatives: Sequence[rules.Negative]) -> tuple[str, list[str], dict[str, Any]]:
    extra = {
        "ranks": [x.rank for x in negatives],
        "scores": [None if x.score is None else round(x.score, 6) for x in negatives],
        "kinds": [x.kind for x in negatives],
    }
    return qid, [x.did for x in negatives], extra


def _positives(root: PathLike, split: str, tasks: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """qid -> the record's whole ``pos_cand_list`` (bad records were reported by the embedding already)."""
    out: dict[str, tuple[str, ...]] = {}
    for task in tasks:
        for q in read_queries(root, split, task, bad=BadRecords("skip")):
            out[q.qid] = q.pos_cand_list
    return out


def _candidates(root: PathLike, split: str, pool: str, tasks: Sequence[str]) -> dict[str, Candidate]:
    if pool == "global":
        return read_global_pool(root, split, bad=BadRecords("skip"))
    out: dict[str, Candidate] = {}
    for task in tasks:
        for did, cand in read_local_pool(root, task, split, bad=BadRecords("skip")).items():
            out.setdefault(did, cand)
    return out


def source_label(manifest: Mapping[str, Any]) -> str:
    """The model the embeddings were made with, as one string."""
    source = manifest.get("source", {})
    if "workdir" in source:
        return f"{source['workdir']} step {source['step']}" + ("" if source["step"] else " (before training)")
    return str(source.get("checkpoint") or source.get("hf_dir") or f"preset {source.get('preset')}")


def _search_blocks(index: Any, queries: np.ndarray, k: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start in range(0, len(queries), _SEARCH_BLOCK):
        ids, scores = index.search(queries[start : start + _SEARCH_BLOCK].astype(np.float32), k)
        yield start, ids, scores


def mine_embeddings(
    emb: Embeddings,
    root: PathLike,
    mcfg: MiningConfig,
    tasks: Sequence[str],
    *,
    search: Any,
    max_decode_pixels: int,
) -> tuple[list[tuple[str, list[str], dict[str, Any]]], dict[str, Any]]:
    """Search and pick for every query of ``tasks`` in ``emb``: the negatives file's records (task order,
    then file order) and the summary's counts."""
    split = emb.manifest["split"]
    positives = _positives(root, split, tasks)
    candidates = _candidates(root, split, mcfg.pool, tasks)
    bad = BadRecords(mcfg.on_bad_record)
    keys = ContentKeys(candidates, lambda path: load_image(root, path, max_pixels=max_decode_pixels), bad)

    def modality_of(did: str) -> str:
        return candidates[did].modality

    pools: dict[str, tuple[list[str], Any]] = {}
    if mcfg.pool == "global":
        ids, vectors = emb.global_pool()
        pools["global"] = (ids, build_index(vectors.astype(np.float32), search, k=mcfg.top_k))
    total = sum(json.loads((emb.directory / "queries" / t / GROUP).read_text())["count"] for t in tasks)
    bar = progress(total, "mine negatives", unit="query", out=sys.stdout)
    records: list[tuple[str, list[str], dict[str, Any]]] = []
    per_task: dict[str, Tally] = {}
    overall = Tally()
    searches: dict[str, Any] = {}
    for task in tasks:
        if mcfg.pool == "global":
            pool_ids, index = pools["global"]
        else:
            pool_ids, vectors = emb.local_pool(task)
            index = build_index(vectors.astype(np.float32), search, k=mcfg.top_k)
        searches.setdefault(mcfg.pool if mcfg.pool == "global" else task, search_info(index))
        target = dataset_task(task).cand_modality
        tally = per_task[task] = Tally()
        qids, q = emb.queries(task)
        for start, neighbours, scores in _search_blocks(index, q, mcfg.top_k):
            for row, qid in enumerate(qids[start : start + len(neighbours)]):
                keep = neighbours[row] >= 0
                ranked = [pool_ids[j] for j in neighbours[row][keep]]
                pos = positives[qid]
                check = keys.checker(pos) if mcfg.false_negative_filter else (lambda did: False)
                negatives = pick(
                    mcfg,
                    ranked,
                    scores[row][keep].tolist(),
                    qid=qid,
                    positives=pos,
                    target_modality=target,
                    modality_of=modality_of,
                    pool=pool_ids,
                    is_false_negative=check,
                )
                records.append(_record(qid, negatives))
                tally.add(negatives, mcfg.negatives, modality_of)
                overall.add(negatives, mcfg.negatives, modality_of)
            bar.update(len(neighbours))
    bar.close()
    counts = {
        **overall.as_json(),
        "false_negatives": {"text": keys.by_text, "image": keys.by_image, "images_decoded": keys.images_decoded},
        "per_task": {t: v.as_json() for t, v in per_task.items()},
        "search": searches,
    }
    if bad.total:
        counts["bad_images"] = {"count": bad.total, "report": bad.report()}
    return records, counts


def settings_of(mcfg: MiningConfig) -> dict[str, Any]:
    """The settings the rule read (``mmembed``'s own ones only for it)."""
    keys = ["negatives", "top_k", "pool", "split", "seed", "false_negative_filter", "random_fallback"]
    if mcfg.rule == "mmembed":
        keys += ["modality_top", "rank_cut", "modality_share"]
    return {"rule": mcfg.rule, "settings": {k: getattr(mcfg, k) for k in keys}}


def mine(
    cfg: TrainerConfig,
    out: PathLike,
    *,
    workdir: PathLike | None,
    step: int | None = None,
    mcfg: MiningConfig | None = None,
) -> epath.Path:
    """Mine hard negatives with the run in ``workdir`` at ``step`` (None: its latest checkpoint; 0: the
    model before training) under ``mcfg`` (default ``cfg.mining``); returns ``out/negatives.jsonl``.
    Every process calls it (the embedding is data-parallel); the primary one searches and writes."""
    mcfg = cfg.mining if mcfg is None else mcfg
    out = as_path(out)
    root = mining_root(cfg, mcfg)
    tasks = mining_tasks(root, mcfg)
    if workdir is not None:
        step = resolve_step(workdir, step)
    step = step or 0
    ecfg = mining_eval_config(cfg, mcfg, root, tasks)
    key = mining_key(cfg, mcfg, ecfg, workdir=workdir, step=step)
    path = out / NEGATIVES
    primary = jax.process_index() == 0
    if primary_says(primary and reusable(out, key)):
        if primary:
            print(f"mined negatives in {path}: reused (nothing they depend on changed)", flush=True)
        return path
    started = time.perf_counter()
    emb_dir = embed(cfg, out / EMBEDDINGS, ecfg, workdir=workdir, step=step)
    if primary:
        emb = Embeddings(emb_dir)
        records, counts = mine_embeddings(
            emb, root, mcfg, tasks, search=cfg.eval.search, max_decode_pixels=ecfg.max_decode_pixels
        )
        (out / SUMMARY).unlink(missing_ok=True)  # no summary of another key beside a new file
        write_negatives(path, records)
        seconds = time.perf_counter() - started
        summary = {
            **settings_of(mcfg),
            "checkpoint": source_label(emb.manifest),
            "mbeir_root": absolute(root),
            "tasks": list(tasks),
            "negatives_file": absolute(path),
            "embeddings": absolute(emb_dir),
            **counts,
            "skipped": emb.manifest.get("skipped") or {},
            "seconds": round(seconds, 3),
            "key": key,
        }
        write_atomic(out / SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())
        print(
            f"mined negatives in {path}: {counts['queries']} queries, {counts['negatives']} negatives "
            f"({', '.join(f'{k} {v}' for k, v in counts['kinds'].items()) or 'none'}), "
            f"{counts['fallback_queries']} needed the random fallback, in {format_duration(seconds)}",
            flush=True,
        )
    sync("mmret.mining.mine")
    return path
