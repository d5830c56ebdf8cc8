"""Output directories that appear whole or not at all: written beside their destination, renamed
into place at the end, deleted on any error."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


class OutputExistsError(FileExistsError):
    """The output exists and is not an empty directory, and replacing it was not asked for."""


def check_output(out: str | Path, force: bool) -> None:
    """Refuse an existing output unless it is an empty directory or ``force`` is set."""
    out = Path(out)
    if force or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    raise OutputExistsError(f"{out}: output exists and is not empty (use --force / force=True to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh directory beside ``out``; rename it to ``out`` on success, delete it on any error."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)).absolute()
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        yield tmp
        check_output(out, force)  # again: it may have appeared while we wrote
        old = None
        if out.is_dir() and not out.is_symlink():
            old = out.with_name(f"{tmp.name}.old")
            out.rename(old)
        elif out.exists() or out.is_symlink():
            out.unlink()
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to a temporary file beside
    ``path``, then rename it over ``path``: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
