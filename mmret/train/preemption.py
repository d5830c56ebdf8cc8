"""A preemption notice (SIGTERM) -> stop and save at a step boundary that every process agrees on."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

log = logging.getLogger("mmret.train")


class Preemption:
    """Multi-process jobs under ``jax.distributed`` with its preemption service (the default) use orbax's
    check (``reached_preemption``, given as ``orbax_check``): the service's notifier owns SIGTERM and the
    sync point names the same step on every host without a device collective. Otherwise a Python SIGTERM
    handler sets a flag, read every step (and all-gathered across processes when there are several)."""

    def __init__(self, orbax_check: Callable[[int], bool] | None = None) -> None:
        self.requested = False
        self._previous: Any = None
        self.orbax_check = orbax_check if jax.process_count() > 1 and _jax_preemption_service() else None

    def install(self) -> None:
        if self.orbax_check is not None:
            return
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            log.warning("not in the main thread: no SIGTERM handler (no save on preemption)")

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.requested = True
        print(f"signal {signum}: saving a checkpoint at the next step boundary", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (call it at every step, on every process)."""
        if self.orbax_check is not None:
            return self.orbax_check(step)
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def _jax_preemption_service() -> bool:
    try:
        from jax._src import distributed

        return (
            distributed.global_state.client is not None and distributed.global_state.preemption_sync_manager is not None
        )
    except (ImportError, AttributeError):
        return False
