"""Agreement between the processes of a multi-host job (no-ops on one process)."""

from __future__ import annotations

import jax
import numpy as np


def primary_says(value: bool) -> bool:
    """``value`` as the primary process has it (every host must take the same branch)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        value = bool(np.asarray(multihost_utils.broadcast_one_to_all(np.array([value])))[0])
    return value


def sync(name: str) -> None:
    """Wait until every process reaches the barrier ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def max_over_processes(values: list[int]) -> list[int]:
    """Per position, the largest of ``values`` any process has (every process calls it)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(np.array(values, np.int32)))
        values = [int(v) for v in gathered.reshape(-1, len(values)).max(axis=0)]
    return list(values)


def gather(values: np.ndarray) -> np.ndarray:
    """``values`` (the same shape on every process) of every process, stacked [processes, ...] (every process
    calls it; one process: ``values[None]``)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(np.asarray(values)))
    return np.asarray(values)[None]
