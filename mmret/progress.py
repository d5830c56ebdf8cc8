"""The one progress display of long work (training, embedding, ArrayRecord builds, conversion): tqdm.

On a terminal it is tqdm's live bar. Written to anything else (a log file, CI, a pipe), carriage-return
redraws would pile up on one line, so each redraw becomes its own line, at most one every ``every``
seconds (default 10) plus the final one: a log shows steady progress lines.

    bar = progress(len(items), "embed queries", unit="item")
    for batch in batches:
        ...
        bar.update(len(batch))
    bar.close()
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

from tqdm import tqdm

#: Seconds between progress lines when the output is not a terminal.
LOG_EVERY = 10.0


class _Lines:
    """A file that turns tqdm's carriage-return redraws into whole lines (for logs)."""

    def __init__(self, out: TextIO):
        self.out = out

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.out.write(line + "\n")

    def flush(self) -> None:
        self.out.flush()


def _is_terminal(out: Any) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):
        return False


def progress(
    total: int | None,
    desc: str,
    *,
    unit: str = "it",
    initial: int = 0,
    every: float | None = None,
    out: TextIO | None = None,
    disable: bool = False,
) -> tqdm:
    """A tqdm bar over ``total`` units (None: unknown) named ``desc``, starting at ``initial`` (a resumed
    job). ``every``: least seconds between redraws (default: tqdm's own on a terminal, :data:`LOG_EVERY`
    elsewhere). ``out``: where it writes (default stderr)."""
    out = sys.stderr if out is None else out
    terminal = _is_terminal(out)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        file=out if terminal else _Lines(out),
        mininterval=(0.1 if terminal else LOG_EVERY) if every is None else every,
        dynamic_ncols=terminal,
        ascii=not terminal,
        disable=disable,
        leave=True,
    )


def format_duration(seconds: float) -> str:
    """``5s``, ``1m05s``, ``2h03m``; ``?`` for a negative or non-finite time."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class StepsBar:
    """A ``progress(done, total, name)`` callback (the converters' and the export's) as one bar, made on the
    first call (nothing with ``quiet``); :meth:`close` writes its final line."""

    def __init__(self, desc: str, *, unit: str = "tensor", quiet: bool = False, out: TextIO | None = None):
        self.desc, self.unit, self.quiet, self.out, self.bar = desc, unit, quiet, out, None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = progress(total, self.desc, unit=self.unit, out=self.out)
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
