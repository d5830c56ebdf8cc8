"""mmret.progress: one line per redraw in logs, at most every ``every`` seconds, the last one always."""

from __future__ import annotations

import io

from mmret.progress import progress


def test_log_output_is_whole_lines_with_the_final_count():
    out = io.StringIO()
    bar = progress(50, "embed queries", unit="item", every=3600.0, out=out)
    for _ in range(10):
        bar.update(5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # every=3600: only the opening line and the closing one, not one per update
    assert 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("embed queries") and "50/50" in lines[-1]


def test_resumed_work_starts_at_initial():
    out = io.StringIO()
    bar = progress(10, "build", initial=4, every=0.0, out=out)
    bar.update(1)
    bar.close()
    assert "5/10" in out.getvalue().splitlines()[-1]


def test_disabled_writes_nothing():
    out = io.StringIO()
    bar = progress(3, "quiet", out=out, disable=True)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
