"""Safe image loading: paths confined to the dataset root, a pixel cap checked before decoding, and one
error type for every way an image can be bad.

:func:`load_image` opens ``root / rel_path`` only when the path is relative, has no ``..`` part and does
not resolve (through symlinks) outside ``root``. The header is read first and an image with more than
``max_pixels`` pixels is rejected before any pixel is decoded (PIL's own decompression-bomb warning and
error become the same rejection). Missing, truncated, corrupt or unreadable files raise
:class:`BadImageError` naming the path and the reason; callers add the record's ``file:line``.

Truncation is caught only while PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default (False).
The warning filter is process-global (``warnings.catch_warnings``): exact in worker processes; with threads
a race can at worst let PIL's warning print instead of raise, and our own cap, checked on every image,
still holds.

Kept by hand rather than left to PIL: PIL's guard (``Image.MAX_IMAGE_PIXELS``) is one process-global number
that only warns between one and two times its value; this cap is per call (the processor's own limit) and
always an error.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import BinaryIO

from etils import epath
from PIL import Image

from mmret.atomic_dir import PathLike, as_path, is_local

#: A decode cap for callers without their own: 8192 x 8192 pixels (real M-BEIR images are far smaller).
DEFAULT_MAX_PIXELS = 8192 * 8192

_DRIVE = re.compile(r"[A-Za-z]:[\\/]")

#: Reason codes of :class:`BadImageError`.
UNSAFE_PATH = "unsafe path"
OUTSIDE_ROOT = "resolves outside the dataset root"
MISSING = "missing file"
NOT_A_FILE = "not a regular file"
UNREADABLE = "unreadable file"
TOO_LARGE = "too many pixels (decompression bomb)"
NOT_AN_IMAGE = "not an image (unknown format or truncated header)"
CORRUPT = "corrupt or truncated image"


class BadImageError(ValueError):
    """An image that cannot be used: ``path`` (as the record names it), a reason and a detail."""

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        self.path = path
        self.reason = reason
        self.detail = detail
        super().__init__(f"image {path!r}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.detail))


def unsafe_path_reason(rel_path: object) -> str | None:
    """Why ``rel_path`` may not name a file under a dataset root (``None`` when it may); string checks only."""
    if not isinstance(rel_path, str) or not rel_path:
        return "not a non-empty string"
    if ".." not in rel_path and "\x00" not in rel_path and rel_path[0] not in "/\\" and rel_path[1:2] != ":":
        return None  # the fast path (pools hold millions of paths)
    if "\x00" in rel_path:
        return "contains a NUL character"
    if rel_path[0] in "/\\" or _DRIVE.match(rel_path):
        return "absolute path"
    if ".." in rel_path.replace("\\", "/").split("/"):
        return "'..' component"
    return None


_REAL_DIRS: dict[str, tuple[str, tuple[int, int]]] = {}


def _real_dir(path: str) -> str:
    """``os.path.realpath(path)`` of a directory, remembered while ``path`` and the remembered answer still reach
    one and the same directory (two ``stat`` calls): pools name millions of images in a few directories, and
    ``realpath`` walks every component in Python. A directory that was moved or replaced (a symlink now, say)
    reaches another inode, and is resolved afresh."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)  # missing: the caller's checks name it
    here = (st.st_dev, st.st_ino)
    known = _REAL_DIRS.get(path)
    if known is not None and known[1] == here:
        try:
            there = os.stat(known[0])
        except OSError:
            there = None
        if there is not None and (there.st_dev, there.st_ino) == here:
            return known[0]
    real = os.path.realpath(path)
    if len(_REAL_DIRS) >= 65536:
        _REAL_DIRS.clear()
    _REAL_DIRS[path] = (real, here)
    return real


def resolve_image_path(root: PathLike, rel_path: str) -> epath.Path:
    """``root / rel_path`` after the safety checks, resolved; raises :class:`BadImageError` when unsafe or missing.

    A root on an object store (``gs://``, ...) has no symlinks: the string checks confine the path there."""
    reason = unsafe_path_reason(rel_path)
    if reason is not None:
        raise BadImageError(str(rel_path), UNSAFE_PATH, reason)
    if not is_local(root):
        path = as_path(root) / rel_path
        if not path.exists():
            raise BadImageError(rel_path, MISSING, f"under {root}")
        if path.is_dir():
            raise BadImageError(rel_path, NOT_A_FILE)
        return path
    root_real = _real_dir(os.fspath(root))
    head, name = os.path.split(rel_path)
    real = os.path.join(_real_dir(os.path.join(root_real, head)) if head else root_real, name)
    if os.path.islink(real):
        real = os.path.realpath(real)
    real = os.path.normpath(real)
    if os.path.commonpath([root_real, real]) != root_real:
        raise BadImageError(rel_path, OUTSIDE_ROOT, f"-> {real}")
    if not os.path.exists(real):
        raise BadImageError(rel_path, MISSING, f"under {root_real}")
    if not os.path.isfile(real):
        raise BadImageError(rel_path, NOT_A_FILE)
    return as_path(real)


def load_image(root: PathLike, rel_path: str, *, max_pixels: int) -> Image.Image:
    """The RGB image at ``root / rel_path``; :class:`BadImageError` for any bad path or bad image."""
    path = resolve_image_path(root, rel_path)
    try:
        # PIL seeks while it decodes: a local file is opened as is, another one is read whole first.
        f = open(path, "rb") if is_local(path) else io.BytesIO(path.read_bytes())  # closed by the ``with`` below
    except OSError as e:
        raise BadImageError(rel_path, UNREADABLE, f"{type(e).__name__}: {e}") from e
    with f:
        return _decode(f, max_pixels=max_pixels, name=rel_path)


def load_image_bytes(data: bytes, *, max_pixels: int, name: str) -> Image.Image:
    """The RGB image encoded in ``data`` (e.g. embedded in a TFDS record); ``name`` appears in errors."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadImageError(name, NOT_AN_IMAGE, f"expected bytes, got {type(data).__name__}")
    return _decode(io.BytesIO(data), max_pixels=max_pixels, name=name)


def _decode(fp: BinaryIO, *, max_pixels: int, name: str) -> Image.Image:
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:  # reads the header only
                width, height = im.size
                if width * height > max_pixels:
                    raise BadImageError(name, TOO_LARGE, f"{width}x{height} = {width * height} > {max_pixels}")
                if width <= 0 or height <= 0:
                    raise BadImageError(name, CORRUPT, f"size {width}x{height}")
                im.load()
                return im.convert("RGB")
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(name, TOO_LARGE, str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise BadImageError(name, NOT_AN_IMAGE) from e
    except MemoryError:
        raise
    except Exception as e:  # PIL reports broken data as OSError, SyntaxError, ValueError, EOFError, ...
        raise BadImageError(name, CORRUPT, f"{type(e).__name__}: {e}") from e
