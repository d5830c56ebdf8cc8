"""Where training metrics go: a progress line on stdout, ``metrics.jsonl`` and TensorBoard event files.

The event files (under ``workdir/tb``) are written by tensorboardX, which needs no TensorFlow, with its
synchronous ``EventsWriter`` rather than its ``SummaryWriter``: a ``SummaryWriter`` hands events to a
background thread, so ``flush()`` after a log point can run before that point reaches the file and a killed
run loses it; here each log point is on disk (flushed and fsynced) before :meth:`MetricWriters.write`
returns.

A workdir on an object store (``gs://...``, through etils.epath) gets the same files: the event file is
written in a local staging directory and copied up whole after each log point, and ``metrics.jsonl`` is
rewritten whole at each log point (object stores have no append).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from etils import epath

from mmret.atomic_dir import PathLike, as_path, is_local
from mmret.progress import format_duration

if TYPE_CHECKING:
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event


def _import_tensorboardx() -> None:
    """Import tensorboardX without torch. Its package ``__init__`` imports its writer, which imports torch when
    torch is installed (about 2 s of CPU and a few hundred MB) only to also accept torch tensors; the event
    writer and protos used here need none of it. While tensorboardX is first imported, ``import torch`` fails
    (it falls back to numpy); a torch imported before, or after, is untouched."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # the import system's "not importable" marker
    try:
        import tensorboardX  # noqa: F401
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def _event_file(logdir: Path | epath.Path, restart_step: int | None) -> EventsWriter:
    """A new event file in ``logdir``; ``restart_step``: a ``SessionLog.START`` there, so TensorBoard drops
    earlier-written points at steps >= it (those of a run killed after its last checkpoint, then resumed)."""
    _import_tensorboardx()
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    logdir.mkdir(parents=True, exist_ok=True)
    # tensorboardX names the file events.out.tfevents.<seconds>.<host><suffix> and truncates an existing
    # one: the suffix keeps two writers started within a second (a quick restart) apart, in start order.
    events = EventsWriter(str(logdir / "events"), filename_suffix=f".{time.time_ns()}.{os.getpid()}")
    if restart_step is not None:
        events.write_event(
            Event(wall_time=time.time(), step=restart_step, session_log=SessionLog(status=SessionLog.START))
        )
    events.flush()
    return events


def _scalar_event(step: int, values: Mapping[str, float]) -> Event:
    """An ``Event`` at ``step`` whose ``Summary`` holds ``values`` as ``simple_value`` scalars."""
    _import_tensorboardx()
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
    return Event(wall_time=time.time(), step=int(step), summary=summary)


# ---------------------------------------------------------------------------------- the writers


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line: drop it


def progress_line(step: int, total: int, metrics: Mapping[str, Any], width: int = 20) -> str:
    """``step  12/100 [##------] loss 1.2345 acc 0.500 tau 0.0500 |g| 1.2 lr 1.0e-04 3.1 ex/s 812 tok/s eta 1m05s``

    Training's one line per log point, printed to stdout here rather than drawn as an :mod:`mmret.progress`
    (tqdm) bar: each line is a record of the run to read back (the loss over the steps), which a bar
    redrawing itself in place on a terminal would erase, and which in a log the bar would thin to one line
    every ``LOG_EVERY`` seconds; the lines interleave with the trainer's other messages (preemption, skipped
    steps, evaluation) on stdout, which a live bar would garble; and the eta is the trainer's own (from the
    step time after compilation), not tqdm's average since start. Tests and tools parse the leading
    ``step N/TOTAL``.
    """
    done = min(max(step / max(total, 1), 0.0), 1.0)
    bar = "#" * int(round(done * width))
    digits = len(str(total))
    parts = [f"step {step:>{digits}}/{total} [{bar:-<{width}}]"]
    fmt = (
        ("loss", "loss", ".4f"),
        ("accuracy", "acc", ".3f"),
        ("temperature", "tau", ".4f"),
        ("grad_norm", "|g|", ".3g"),
        ("learning_rate", "lr", ".2e"),
    )
    for key, label, spec in fmt:
        if metrics.get(key) is not None:
            parts.append(f"{label} {metrics[key]:{spec}}")
    if metrics.get("examples_per_s"):
        parts.append(f"{metrics['examples_per_s']:.1f} ex/s")
    if metrics.get("tokens_per_s"):
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    if metrics.get("skipped_steps"):
        parts.append(f"skipped {metrics['skipped_steps']}")
    if "eta_s" in metrics:
        parts.append(f"eta {format_duration(metrics['eta_s'])}")
    return " ".join(parts)


class MetricWriters:
    """stdout progress lines, ``workdir/metrics.jsonl`` and TensorBoard under ``workdir/tb``.

    ``resume_step``: the run continues from that checkpoint, so records of later steps (written by a
    run that died after it) are dropped from the jsonl and TensorBoard is told to drop them too.
    Only the primary process (process 0 of a multi-host job) prints progress and writes files.
    """

    def __init__(
        self,
        workdir: PathLike,
        *,
        total_steps: int,
        resume_step: int = 0,
        primary: bool = True,
        out: TextIO | None = None,
    ):
        self.workdir = as_path(workdir)
        self.total_steps = total_steps
        self.out = sys.stdout if out is None else out
        self.primary = primary
        self._events: EventsWriter | None = None
        self._jsonl: TextIO | None = None
        self._remote = not is_local(workdir)
        self._lines: list[str] = []  # metrics.jsonl's lines, for a workdir on an object store
        self._staging: Path | None = None  # where the event file is written before it is copied up
        if primary:
            self.workdir.mkdir(parents=True, exist_ok=True)
            path = self.workdir / "metrics.jsonl"
            if path.exists():
                keep = [
                    line
                    for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _step_of(line) <= resume_step
                ]
                self._lines = [line if line.endswith("\n") else line + "\n" for line in keep]
                path.write_text("".join(self._lines), encoding="utf-8")
            restart = resume_step + 1 if resume_step else None
            if self._remote:
                import tempfile

                self._staging = Path(tempfile.mkdtemp(prefix="mmret_tb_"))
                self._events = _event_file(self._staging, restart_step=restart)
                self._upload_events()
            else:
                self._events = _event_file(self.workdir / "tb", restart_step=restart)
                self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def _upload_events(self) -> None:
        """Copy the staged event file up to ``workdir/tb`` whole (a workdir on an object store)."""
        assert self._staging is not None and self._events is not None
        local = Path(self._events._file_name)  # (tensorboardX names the file only in this attribute)
        target = self.workdir / "tb" / local.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(local.read_bytes())

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One log point: a progress line, a jsonl record and TensorBoard scalars (numbers only, not
        ``eta_s``), both on disk when this returns."""
        if not self.primary:
            return
        print(progress_line(step, self.total_steps, metrics), file=self.out, flush=True)
        numbers = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        }
        assert self._events is not None
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in numbers.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        else:  # an object store: the whole file again
            self._lines.append(json.dumps(record) + "\n")
            (self.workdir / "metrics.jsonl").write_text("".join(self._lines), encoding="utf-8")
        scalars = {k: v for k, v in numbers.items() if k != "eta_s"}
        if scalars:
            self._events.write_event(_scalar_event(step, scalars))
            self._events.flush()
            if self._remote:
                self._upload_events()

    def print(self, *lines: str, every_process: bool = False) -> None:
        """Print on the primary process (or on every process: what differs between them)."""
        if self.primary or every_process:
            for line in lines:
                print(line, file=self.out, flush=True)

    def close(self) -> None:
        """Close the jsonl and the event file (again: nothing)."""
        if self._jsonl is not None and not self._jsonl.closed:
            self._jsonl.close()
        if self._events is not None:
            self._events.close()
            if self._remote:
                self._upload_events()
            self._events = None
        if self._staging is not None:
            import shutil

            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
