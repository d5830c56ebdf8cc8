"""The distillation teacher (U-MARVEL's stage 5 lists): retrieve, rerank, fuse, write.

``build_teacher(cfg, out, retriever=RUN, reranker=RUN)``, ``cfg`` the distillation run's config (its
``distill``, :class:`mmret.recipe.DistillConfig`):

1. The retriever run's final model embeds a seeded ``distill.fraction`` of each task's ``distill.split``
   queries (:func:`mmret.data.stores.sample_queries`) and the tasks' local pools (:func:`mmret.eval.embed.embed`:
   resumable, data-parallel; its own run config's encoder, processor and batch shapes) into ``out/embeddings``.
2. Each query's local top ``distill.top_k`` (``eval.search``) is written as a TREC run with a retrieval report
   (:func:`mmret.eval.evaluate.evaluate`) into ``out/retrieval``.
3. The reranker run's final model scores every (query, candidate) pair of those runs as the rerank mode does
   (:func:`mmret.eval.rerank.scored_run`: data-parallel, ``rerank.batch_size`` pairs per host, each task's
   P(yes) kept in ``out/scores/<task>.npz`` once complete, so a restarted build rescores only what is missing).
4. ``out/teacher.jsonl``: per query ``qid``, ``task``, the list's ``dids`` (retrieval order), ``cosine``,
   ``p_yes`` and ``fused = cosine + w * p_yes`` (``distill.weight_of(task)``); ``out/summary.json``: the
   counts, weights, the retrieval's recall on the sampled queries, and ``key``.

A rerun whose ``key`` (the embeddings' key, the reranker checkpoint, the distill and rerank settings, the
search) matches returns the existing file without loading a model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from etils import epath

from mmret import build
from mmret.atomic_dir import PathLike, absolute, as_path, write_atomic
from mmret.checkpoints import load_trained_reranker, resolve_step, run_config
from mmret.data.bad_records import BadRecords
from mmret.data.mbeir import EVAL_TASKS, dataset_task, query_path
from mmret.data.processor import Processor
from mmret.data.stores import EvalStore
from mmret.data.teacher import write_teacher
from mmret.eval.embed import embed, embed_key, source_of
from mmret.eval.evaluate import evaluate
from mmret.eval.rerank import Scorer, scored_run
from mmret.multihost import primary_says, sync
from mmret.progress import format_duration
from mmret.recipe import DistillConfig, EvalConfig, TrainerConfig, config_to_json

TEACHER = "teacher.jsonl"  # the format: mmret.data.teacher
SUMMARY = "summary.json"
EMBEDDINGS = "embeddings"
RETRIEVAL = "retrieval"
SCORES = "scores"
KEY_VERSION = 1


def teacher_root(cfg: TrainerConfig) -> str:
    root = cfg.data.root or cfg.eval.root
    if not root:
        raise ValueError("data.root: no M-BEIR root given to build the distillation teacher from")
    return root


def teacher_tasks(cfg: TrainerConfig, root: PathLike) -> list[str]:
    """``distill.tasks``, else ``data.tasks``, else every dataset-task with a ``distill.split`` query file."""
    dcfg = cfg.distill
    named = dcfg.tasks if dcfg.tasks is not None else cfg.data.tasks
    if named is not None:
        return [dataset_task(t).name for t in named]
    tasks = [t.name for t in EVAL_TASKS if query_path(root, dcfg.split, t).is_file()]
    if not tasks:
        raise FileNotFoundError(f"{as_path(root) / 'query' / dcfg.split}: no {dcfg.split} query files")
    return tasks


def teacher_eval_config(
    retriever_cfg: TrainerConfig, dcfg: DistillConfig, root: str, tasks: Sequence[str]
) -> EvalConfig:
    """The retriever's embedding settings (its run's ``eval``: batch shapes) on the teacher's queries."""
    return dataclasses.replace(
        retriever_cfg.eval,
        root=root,
        split=dcfg.split,
        tasks=tuple(tasks),
        pools=("local",),
        on_bad_record=dcfg.on_bad_record,
        query_fraction=dcfg.fraction,
        query_seed=dcfg.seed,
        top=dcfg.top_k,
        check_exact=0,
        at_start=False,
        at_end=False,
    )


def scoring_config(reranker_cfg: TrainerConfig, dcfg: DistillConfig, ecfg: EvalConfig) -> TrainerConfig:
    """The reranker's run config, rescoring each list's ``distill.top_k`` with the retriever's instruction draw."""
    return dataclasses.replace(
        reranker_cfg,
        rerank=dataclasses.replace(reranker_cfg.rerank, top_k=dcfg.top_k),
        eval=dataclasses.replace(
            reranker_cfg.eval, instruction_seed=ecfg.instruction_seed, max_decode_pixels=ecfg.max_decode_pixels
        ),
    )


def teacher_key(
    retriever_cfg: TrainerConfig,
    ecfg: EvalConfig,
    reranker_cfg: TrainerConfig,
    dcfg: DistillConfig,
    search: Any,
    *,
    retriever: PathLike,
    retriever_step: int,
    reranker: PathLike,
    reranker_step: int,
) -> dict[str, Any]:
    """What a teacher file depends on (file stats only, cheap)."""
    r = reranker_cfg.rerank
    key = {
        "version": KEY_VERSION,
        "embeddings": embed_key(retriever_cfg, ecfg, workdir=retriever, step=retriever_step),
        "reranker": source_of(reranker_cfg, reranker, reranker_step),
        "rerank": {k: getattr(r, k) for k in ("prompt", "max_text_tokens", "max_length")},
        "distill": {k: v for k, v in config_to_json(dcfg).items() if k != "teacher_file"},
        "search": config_to_json(search),
    }
    return json.loads(json.dumps(key))


def reusable(out: epath.Path, key: Mapping[str, Any]) -> bool:
    summary = out / SUMMARY
    if not (summary.is_file() and (out / TEACHER).is_file()):
        return False
    try:
        return json.loads(summary.read_text()).get("key") == key
    except (json.JSONDecodeError, AttributeError):
        return False


def build_teacher(cfg: TrainerConfig, out: PathLike, *, retriever: PathLike, reranker: PathLike) -> epath.Path:
    """Build the teacher of ``cfg.distill`` with the final models of the runs ``retriever`` and ``reranker``
    into ``out`` (see the module docstring); returns ``out/teacher.jsonl``. Every process calls it."""
    dcfg = cfg.distill
    out = as_path(out)
    root = teacher_root(cfg)
    tasks = teacher_tasks(cfg, root)
    retriever_cfg, reranker_cfg = run_config(retriever), run_config(reranker)
    if reranker_cfg.task != "reranker":
        raise ValueError(
            f"{reranker}: teacher_from must name a reranker run (task='reranker'), got {reranker_cfg.task!r}"
        )
    retriever_step, reranker_step = resolve_step(retriever, None), resolve_step(reranker, None)
    ecfg = teacher_eval_config(retriever_cfg, dcfg, root, tasks)
    key = teacher_key(
        retriever_cfg,
        ecfg,
        reranker_cfg,
        dcfg,
        cfg.eval.search,
        retriever=retriever,
        retriever_step=retriever_step,
        reranker=reranker,
        reranker_step=reranker_step,
    )
    path = out / TEACHER
    primary = jax.process_index() == 0
    if primary_says(primary and reusable(out, key)):
        if primary:
            print(f"distillation teacher in {path}: reused (nothing it depends on changed)", flush=True)
        return path
    started = time.perf_counter()
    emb_dir = embed(retriever_cfg, out / EMBEDDINGS, ecfg, workdir=retriever, step=retriever_step)
    if primary:
        retrieval = evaluate(
            emb_dir, root, "local", out / RETRIEVAL, search=cfg.eval.search, top=dcfg.top_k, tasks=tasks, tag="teacher"
        )
    sync("mmret.distill.teacher.retrieval")

    scfg = scoring_config(reranker_cfg, dcfg, ecfg)
    processor = Processor(build.processor_dir(scfg), scfg.data.processor)
    renderer = build.pair_renderer(processor, scfg.rerank)
    model = load_trained_reranker(
        reranker_cfg, reranker, reranker_step, max_image_patches=processor.patcher.max_patches
    )
    scorer = Scorer(model, scfg, renderer.yes_id, renderer.no_id)
    store = EvalStore(
        root,
        dcfg.split,
        tasks,
        ["local"],
        BadRecords(dcfg.on_bad_record),
        query_fraction=dcfg.fraction,
        query_seed=dcfg.seed,
    )
    label = f"{absolute(reranker)} step {reranker_step}"
    records: list[dict[str, Any]] = []
    queries: dict[str, int] = {}
    for task in tasks:
        run = scored_run(
            scfg, out / RETRIEVAL, task, out / SCORES, store=store, renderer=renderer, scorer=scorer, checkpoint=label
        )
        w = dcfg.weight_of(task)
        queries[task] = len(run.qids)
        for qid, dids, cos, p in zip(run.qids, run.dids, run.cosine, run.p_yes, strict=True):
            records.append(
                {
                    "qid": qid,
                    "task": task,
                    "dids": dids,
                    "cosine": [round(c, 6) for c in cos],
                    "p_yes": [round(y, 6) for y in p],
                    "fused": [round(c + w * y, 6) for c, y in zip(cos, p, strict=True)],
                }
            )
    if primary:
        (out / SUMMARY).unlink(missing_ok=True)
        write_teacher(path, records)
        seconds = time.perf_counter() - started
        summary = {
            "retriever": f"{absolute(retriever)} step {retriever_step}",
            "reranker": label,
            "tasks": list(tasks),
            "queries": queries,
            "pairs": sum(len(r["dids"]) for r in records),
            "weights": {t: dcfg.weight_of(t) for t in tasks},
            "retrieval_recall": {t: r["headline"] for t, r in retrieval["tasks"].items()},
            "teacher_file": absolute(path),
            "seconds": round(seconds, 3),
            "key": key,
        }
        write_atomic(out / SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())
        print(
            f"distillation teacher in {path}: {len(records)} queries, {summary['pairs']} pairs rescored, "
            f"in {format_duration(seconds)}",
            flush=True,
        )
    sync("mmret.distill.teacher")
    return path
