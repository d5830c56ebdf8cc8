"""Paths on any file system, and outputs that appear whole or not at all.

Paths: a root, workdir or output is taken as ``str | os.PathLike`` (a ``pathlib.Path``, an ``epath.Path``)
and made an ``epath.Path`` with :func:`as_path`, so ``gs://`` and the other file systems :mod:`etils.epath`
knows work; a ``gs://`` string stays a ``gs://`` path (``pathlib.Path`` would turn it into the local
``gs:/...``). Two things epath does not do as pathlib does, here: :func:`absolute` (epath's
``absolute()`` prefixes the working directory to a ``gs://`` path; this keeps a URI as it is and gives a
local path exactly as ``pathlib.Path.absolute()`` does) and :func:`stamp` (epath's ``stat()`` has
whole-second mtimes; a local file keeps its ``st_mtime_ns``).

Outputs are written beside their destination under a temporary name, renamed into place at the end and
deleted on any error. On a local disk a file is written to a temporary name, flushed and ``fsync`` ed,
then renamed over its destination (``os.replace``: one atomic step), and a directory is renamed into
place in one step (an existing one, replaced with ``force``, is first renamed aside). On an object store
(``gs://``, ...) there is no rename: epath's rename copies every object and deletes the originals. A
file written there still appears whole (an object becomes visible only once its upload is complete, and
the copy is of a complete object; no ``fsync``: closing the upload commits it), but a directory does
not: while its objects are copied a reader can see part of it, and a failure in the middle can leave a
partial copy at the destination.

Kept by hand: orbax writes its own checkpoints atomically but offers nothing for other outputs (embedding
shards, search indexes, reports, converted model directories), and no maintained library does the
rename-into-place for directories on both local disks and epath's file systems.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from etils import epath

#: What a root, workdir or output may be given as.
PathLike = str | os.PathLike

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path`` (local, or on the file system its ``scheme://`` names)."""
    return epath.Path(path)


def is_local(path: PathLike) -> bool:
    """Whether ``path`` is on the local file system (no ``scheme://`` prefix)."""
    return _URI.match(os.fspath(path)) is None


def absolute(path: PathLike) -> str:
    """``path`` made absolute, as a string: a local path as ``pathlib.Path(path).absolute()``, a URI as is."""
    return str(Path(path).absolute()) if is_local(path) else str(as_path(path))


def stamp(path: PathLike) -> list[int]:
    """``[size, mtime_ns]`` of a file (a cheap fingerprint: nothing is read). A local file gives
    ``os.stat``'s nanoseconds; other file systems whole seconds (epath's ``stat()``), in nanoseconds."""
    if is_local(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    st = as_path(path).stat()
    return [st.length, st.mtime * 1_000_000_000]


class OutputExistsError(FileExistsError):
    """The output exists and is not an empty directory, and replacing it was not asked for."""


def _is_symlink(path: PathLike) -> bool:
    return is_local(path) and os.path.islink(path)  # object stores have no symlinks


def check_output(out: PathLike, force: bool) -> None:
    """Refuse an existing output unless it is an empty directory or ``force`` is set."""
    out = as_path(out)
    if force or not (out.exists() or _is_symlink(out)):
        return
    if out.is_dir() and not _is_symlink(out) and not any(out.iterdir()):
        return
    raise OutputExistsError(f"{out}: output exists and is not empty (use --force / force=True to replace it)")


def _remove_tree(path: epath.Path) -> None:
    """Delete ``path`` and everything under it, ignoring errors (cleanup after a failure)."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.rmtree(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(out: PathLike, *, force: bool = False) -> Iterator[Path | epath.Path]:
    """Yield a fresh directory beside ``out``; rename it to ``out`` on success, delete it on any error
    (on an object store the rename is a copy: see the module docstring). The directory is a
    ``pathlib.Path`` on a local disk (writers may use its local-only methods, e.g. ``chmod``), else an
    ``epath.Path``."""
    out = as_path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | epath.Path
    if is_local(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)).absolute()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
    else:
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
    try:
        yield tmp
        check_output(out, force)  # again: it may have appeared while we wrote
        old = None
        if out.is_dir() and not _is_symlink(out):
            old = out.with_name(f"{tmp.name}.old")
            out.rename(old)
        elif out.exists() or _is_symlink(out):
            out.unlink()
        as_path(tmp).rename(out)
        if old is not None:
            old.rmtree()
    except BaseException:
        _remove_tree(as_path(tmp))
        raise


def _write(f: BinaryIO, data: bytes | Callable[[BinaryIO], None]) -> None:
    if callable(data):
        data(f)
    else:
        f.write(data)


def write_atomic(path: PathLike, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to a temporary file beside
    ``path``, then rename it over ``path``: all or nothing (on an object store the rename is a copy of
    the complete temporary object)."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(path):
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            with tmp.open("wb") as f:
                _write(f, data)
            tmp.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        return
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
