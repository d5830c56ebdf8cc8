"""mmret.train.metrics: what MetricWriters writes, read back with TensorBoard's own reader (its
EventAccumulator, through ``helpers.read_scalars``) and as JSON lines."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from helpers import read_scalars

from mmret.progress import format_duration
from mmret.train.metrics import MetricWriters, progress_line


def f32(x: float) -> float:
    """What an event file's ``simple_value`` (a float32) keeps of ``x``."""
    return float(np.float32(x))


def log_point(step: int, loss: float) -> dict:
    return {
        "step": step,
        "loss": loss,
        "accuracy": 0.25 * step,
        "temperature": 0.05,
        "examples_per_s": 3.125,
        "skipped_steps": 0,
        "eta_s": 65.0,
        "note": "not a number",  # skipped: not numeric
        "converged": False,  # skipped: a bool is no scalar
        "grad_norm": None,  # skipped
    }


def test_a_run_reads_back_in_tensorboard_and_jsonl(tmp_path):
    out = io.StringIO()
    w = MetricWriters(tmp_path, total_steps=10, out=out)
    losses = [2.0, 1.2345678, math.nan]
    for step, loss in enumerate(losses, start=1):
        w.write(step, log_point(step, loss))
    w.close()

    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == {"loss", "accuracy", "temperature", "examples_per_s", "skipped_steps"}
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["loss"][:2]] == [f32(2.0), f32(1.2345678)]
    assert math.isnan(scalars["loss"][2][1])
    assert scalars["accuracy"] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert scalars["temperature"] == [(s, f32(0.05)) for s in (1, 2, 3)]
    assert scalars["skipped_steps"] == [(s, 0.0) for s in (1, 2, 3)]

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1] == {
        "step": 2,
        "loss": 1.2345678,
        "accuracy": 0.5,
        "temperature": 0.05,
        "examples_per_s": 3.125,
        "skipped_steps": 0.0,
        "eta_s": 65.0,
    }
    assert records[2]["loss"] == "nan"  # JSON has no NaN: non-finite numbers as strings

    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # one line per log point
    assert lines[1] == "step  2/10 [####----------------] loss 1.2346 acc 0.500 tau 0.0500 3.1 ex/s eta 1m05s"


def test_each_log_point_is_on_disk_before_write_returns(tmp_path):
    """Read back before close(): a run killed after a log point has lost none of it."""
    w = MetricWriters(tmp_path, total_steps=5, out=io.StringIO())
    w.write(1, {"loss": 1.5})
    w.write(2, {"loss": 1.25})
    try:
        assert read_scalars(tmp_path / "tb") == {"loss": [(1, 1.5), (2, 1.25)]}
        assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    finally:
        w.close()


def test_a_resumed_run_appends_and_replaces_the_orphaned_steps(tmp_path):
    """A run logs steps 1-4 and dies after its checkpoint of step 2; the resumed run logs 3-5: TensorBoard
    shows 1-2 of the first run and 3-5 of the second, once each; so does the jsonl."""
    first = MetricWriters(tmp_path, total_steps=5, out=io.StringIO())
    for step in (1, 2, 3, 4):
        first.write(step, {"loss": float(step)})
    first.close()
    second = MetricWriters(tmp_path, total_steps=5, resume_step=2, out=io.StringIO())
    for step in (3, 4, 5):
        second.write(step, {"loss": 10.0 * step})
    second.close()

    assert len(list(Path(tmp_path / "tb").iterdir())) == 2  # a new file; the first one kept (same second)
    assert read_scalars(tmp_path / "tb") == {"loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_not_primary_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    out = io.StringIO()
    w = MetricWriters(workdir, total_steps=5, primary=False, out=out)
    w.write(1, {"loss": 1.5})
    w.print("only the primary prints this")
    w.close()
    assert not workdir.exists() and out.getvalue() == ""
    w.print("every process prints this", every_process=True)
    assert out.getvalue() == "every process prints this\n"


def test_progress_line_and_durations():
    line = progress_line(100, 100, {"loss": 0.5, "skipped_steps": 2, "tokens_per_s": 812.4, "eta_s": 0.0})
    assert line == "step 100/100 [####################] loss 0.5000 812 tok/s skipped 2 eta 0s"
    assert [format_duration(s) for s in (5, 65, 7380, -1, math.inf)] == ["5s", "1m05s", "2h03m", "?", "?"]
