"""Chained recipes: the stages of a config (``stages``) run in order, each a run of its own.

A stage's config is the recipe's own with the stage's ``overrides`` merged in (:func:`stage_config`); it
trains in ``<workdir>/<stage>``, starting from an earlier stage's final weights (``init_from``, LoRA
merged: :func:`mmret.checkpoints.initial_model`) or from the model source, after mining hard negatives
with an earlier stage's model when it says ``mine_from`` (into ``<workdir>/<stage>/mined/``: the
negatives file becomes the stage's ``data.negatives_file``), and after building a distillation teacher with
the ``init_from`` stage's retriever and the ``teacher_from`` stage's reranker when it says ``teacher_from``
(into ``<workdir>/<stage>/teacher/``, :mod:`mmret.distill.teacher`: the file becomes its
``distill.teacher_file``). ::

    <workdir>/chain.json            the chain's config (informational)
    <workdir>/<stage>/              the stage's run (config.json, checkpoints/, metrics.jsonl, eval/)
    <workdir>/<stage>/mined/        with mine_from: embeddings, negatives.jsonl, summary.json
    <workdir>/<stage>/teacher/      with teacher_from: embeddings, retrieval/, scores/, teacher.jsonl, summary.json
    <workdir>/<stage>/stage_done.json   written once the stage trained and (eval.at_end) was evaluated

A restart skips the stages with ``stage_done.json`` and resumes the interrupted one where it stopped (its
checkpoints, its mining's and teacher's finished embedding shards, the teacher's scored tasks), so an
interrupted chain ends with the parameters of an uninterrupted one. ``only`` runs one stage (the stages it
starts, mines or distills from must be finished).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

from mmret import tasks
from mmret.atomic_dir import PathLike, absolute, as_path, write_atomic
from mmret.checkpoints import run_config
from mmret.eval import run as eval_run
from mmret.recipe import StageConfig, TrainerConfig, config_to_json, parse
from mmret.train.trainer import train

DONE = "stage_done.json"
MINED = "mined"
TEACHER = "teacher"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class StageOrderError(ValueError):
    """A stage needs an earlier one that has not finished."""


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: nested mappings key by key, anything else replaces."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def check_stages(cfg: TrainerConfig) -> None:
    """``ValueError`` naming the stage: names unique and usable as directory names; ``init_from``,
    ``mine_from`` and ``teacher_from`` name an earlier stage (``teacher_from`` needs ``init_from``, the
    retriever that retrieves the teacher's lists); every stage's merged config parses."""
    seen: list[str] = []
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{i}]"
        if not _NAME.fullmatch(stage.name):
            raise ValueError(f"{where}.name: {stage.name!r} is not a directory name (letters, digits, _ . -)")
        if stage.name in seen:
            raise ValueError(f"{where}.name: {stage.name!r} appears twice")
        if stage.teacher_from is not None and stage.init_from is None:
            raise ValueError(f"{where}.teacher_from: needs init_from (the retriever whose lists the reranker scores)")
        for field in ("init_from", "mine_from", "teacher_from"):
            ref = getattr(stage, field)
            if ref is not None and ref not in seen:
                raise ValueError(f"{where}.{field}: {ref!r} is not an earlier stage (earlier: {seen or 'none'})")
        seen.append(stage.name)
        stage_config(cfg, stage.name, "/nonexistent")  # parses (the workdir only enters paths)


def stage(cfg: TrainerConfig, name: str) -> StageConfig:
    for s in cfg.stages:
        if s.name == name:
            return s
    raise ValueError(f"--stage={name}: no such stage (stages: {', '.join(s.name for s in cfg.stages)})")


def stage_dir(workdir: PathLike, name: str) -> epath.Path:
    return as_path(absolute(workdir)) / name


def stage_config(cfg: TrainerConfig, name: str, workdir: PathLike) -> TrainerConfig:
    """The run config of stage ``name`` of the chain ``cfg`` run in ``workdir``."""
    index = [s.name for s in cfg.stages].index(stage(cfg, name).name)
    s = cfg.stages[index]
    base = {k: v for k, v in config_to_json(cfg).items() if k != "stages"}
    merged = merge(base, s.overrides)
    if s.init_from:
        merged = merge(merged, {"model": {"init_from": str(stage_dir(workdir, s.init_from)), "init_step": None}})
    if s.mine_from:
        negatives = stage_dir(workdir, name) / MINED / "negatives.jsonl"
        merged = merge(merged, {"data": {"negatives_file": str(negatives)}})
    if s.teacher_from:
        teacher = stage_dir(workdir, name) / TEACHER / "teacher.jsonl"
        merged = merge(merged, {"distill": {"teacher_file": str(teacher)}})
    return parse(TrainerConfig, merged, where=f"stages[{index}] ({name}).")


def done(workdir: PathLike, name: str) -> dict[str, Any] | None:
    """What a finished stage recorded (``None``: not finished)."""
    path = stage_dir(workdir, name) / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def _require_done(workdir: PathLike, name: str, needed: str, why: str) -> None:
    if done(workdir, needed) is None:
        raise StageOrderError(f"stage {name} {why} stage {needed}, which has not finished (run it first)")


def mine_for(cfg: TrainerConfig, workdir: PathLike, name: str) -> epath.Path:
    """Mine stage ``name``'s hard negatives with its ``mine_from`` stage's final model; the negatives file."""
    from mmret.mining.mine import mine

    s = stage(cfg, name)
    assert s.mine_from is not None
    source = stage_dir(workdir, s.mine_from)
    _require_done(workdir, name, s.mine_from, "mines with")
    scfg = stage_config(cfg, name, workdir)
    mcfg = scfg.mining
    if mcfg.tasks is None and scfg.data.tasks is not None:  # mine the queries the stage trains on
        mcfg = dataclasses.replace(mcfg, tasks=scfg.data.tasks)
    return mine(run_config(source), stage_dir(workdir, name) / MINED, workdir=source, step=None, mcfg=mcfg)


def teacher_for(cfg: TrainerConfig, workdir: PathLike, name: str) -> epath.Path:
    """Build stage ``name``'s distillation teacher: its ``init_from`` stage's retriever retrieves, its
    ``teacher_from`` stage's reranker rescores (:func:`mmret.distill.teacher.build_teacher`); the file."""
    from mmret.distill.teacher import build_teacher

    s = stage(cfg, name)
    assert s.teacher_from is not None and s.init_from is not None
    _require_done(workdir, name, s.teacher_from, "distills")
    scfg = stage_config(cfg, name, workdir)
    return build_teacher(
        scfg,
        stage_dir(workdir, name) / TEACHER,
        retriever=stage_dir(workdir, s.init_from),
        reranker=stage_dir(workdir, s.teacher_from),
    )


def run_stage(cfg: TrainerConfig, workdir: PathLike, name: str) -> dict[str, Any]:
    """Mine (with ``mine_from``), build the teacher (with ``teacher_from``), train, evaluate (``eval.at_start``
    / ``at_end``) stage ``name``; record it finished unless the run was preempted.
    Returns the stage's record (see :data:`DONE`)."""
    s = stage(cfg, name)
    sub = stage_dir(workdir, name)
    if s.init_from:
        _require_done(workdir, name, s.init_from, "starts from")
    primary = jax.process_index() == 0
    if primary:
        print(f"\n=== stage {name} ===", flush=True)
    if s.mine_from:
        mine_for(cfg, workdir, name)
    if s.teacher_from:
        teacher_for(cfg, workdir, name)
    scfg = stage_config(cfg, name, workdir)
    task = tasks.get(scfg.task)
    task.check(scfg)
    inputs = task.open_inputs(scfg)
    start = eval_run.evaluate_run(scfg, sub, 0) if scfg.eval.at_start else {}
    summary = train(scfg, sub, task=task, inputs=inputs)
    record: dict[str, Any] = {
        "stage": name,
        "final_step": summary["final_step"],
        "loss": summary.get("loss"),
        "preempted": summary["preempted"],
    }
    if start:
        record["eval_start"] = {pool: r["average"] for pool, r in start.items()}
    if summary["preempted"]:
        return record
    if scfg.eval.at_end:
        reports = eval_run.evaluate_run(scfg, sub, summary["final_step"])
        record["eval"] = {pool: r["average"] for pool, r in reports.items()}
    if primary:
        write_atomic(sub / DONE, json.dumps(record, indent=1).encode() + b"\n")
    return record


def run_chain(cfg: TrainerConfig, workdir: PathLike, only: str | None = None) -> list[dict[str, Any]]:
    """Run the chain's stages in order (or ``only`` that one); finished stages are skipped. Stops after a
    preempted stage. Returns each stage's record, in order (a skipped one's as it was written)."""
    check_stages(cfg)
    workdir = as_path(absolute(workdir))
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "chain.json").write_text(json.dumps(config_to_json(cfg), indent=1) + "\n")
    records = []
    for s in cfg.stages:
        if only is not None and s.name != only:
            continue
        previous = done(workdir, s.name)
        if previous is not None:
            if jax.process_index() == 0:
                print(f"stage {s.name}: finished at step {previous['final_step']}, skipped", flush=True)
            records.append(previous)
            continue
        record = run_stage(cfg, workdir, s.name)
        records.append(record)
        if record["preempted"]:
            break
    return records


def chain_table(records: list[dict[str, Any]], pools: tuple[str, ...] = ("local", "global")) -> str:
    """Markdown: per stage the steps, the last logged loss and the evaluation average of each pool."""
    head = "| stage | steps | loss | " + " | ".join(f"{p} avg" for p in pools) + " |"
    lines = [head, "|" + "---|" * (3 + len(pools))]
    for r in records:
        if r.get("eval_start"):  # the model the stage started from (the chain's first row)
            cells = [f"{r['eval_start'][p]:.1f}" if p in r["eval_start"] else "n/a" for p in pools]
            lines.append(f"| (before {r['stage']}) | 0 | n/a | " + " | ".join(cells) + " |")
        loss = f"{r['loss']:.4g}" if isinstance(r.get("loss"), float) else "n/a"
        evals = r.get("eval") or {}
        cells = [f"{evals[p]:.1f}" if p in evals else "n/a" for p in pools]
        state = " (preempted)" if r.get("preempted") else ""
        lines.append(f"| {r['stage']}{state} | {r['final_step']} | {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
