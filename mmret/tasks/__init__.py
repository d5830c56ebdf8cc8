"""Kinds of training (:class:`~mmret.tasks.base.Task`), by the name a config's ``task`` field gives."""

from __future__ import annotations

from collections.abc import Callable

from mmret.tasks.base import Task

#: name -> a factory of the task (imported on use, so naming a task loads only its module).
TASKS: dict[str, Callable[[], Task]] = {}


def _bi_encoder() -> Task:
    from mmret.tasks.bi_encoder.task import BiEncoder

    return BiEncoder()


def _reranker() -> Task:
    from mmret.tasks.reranker.task import RerankerTask

    return RerankerTask()


def _distill() -> Task:
    from mmret.tasks.distill.task import DistillTask

    return DistillTask()


TASKS["bi_encoder"] = _bi_encoder
TASKS["reranker"] = _reranker
TASKS["distill"] = _distill


def get(name: str) -> Task:
    """The task called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]()
