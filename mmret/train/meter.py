"""Averaging a log interval's step metrics and timing the steps."""

from __future__ import annotations

import time

import numpy as np


class Meter:
    """Averages the finite steps' metrics over a log interval; examples/s and tokens/s over the
    steps timed since the last log point (the clock restarts after the first, compiling step).

    Each record says how many steps its averages cover, ``averaged_steps``: ``log_every`` in a steady
    run; fewer in the first interval after a resume (only the steps since the checkpoint, which need
    not be a log point), at the last step of a preempted run, or when non-finite steps were skipped
    (they are left out of the averages)."""

    def __init__(self, global_batch: int, total_steps: int):
        self.global_batch, self.total_steps = global_batch, total_steps
        self.interval: list[dict[str, float]] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, metrics: dict[str, float] | None, tokens: int) -> None:
        """One step: its metrics (None for a skipped step) and its global token count."""
        if metrics is not None:
            self.interval.append(metrics)
        self.steps += 1
        self.tokens += tokens

    def record(self, step: int) -> dict[str, float]:
        """The log record at ``step``; starts the next interval."""
        now = time.perf_counter()
        out = {
            key: float(np.mean([m[key] for m in self.interval])) for key in (self.interval[0] if self.interval else ())
        }
        out["averaged_steps"] = len(self.interval)
        if self.steps and now > self.clock:
            seconds = now - self.clock
            out["examples_per_s"] = self.steps * self.global_batch / seconds
            out["tokens_per_s"] = self.tokens / seconds
            out["eta_s"] = (self.total_steps - step) * seconds / self.steps
        self.interval.clear()
        self.restart_clock()
        return out
