"""A cache on disk of what ``transformers.AutoTokenizer`` makes of a tokenizer directory.

Building a :class:`mmret.data.processor.Processor` needs the fast tokenizer's backend (its JSON) and pad
id. ``AutoTokenizer.from_pretrained`` gives both, but importing transformers (and torch, which it imports
when installed) costs about 4 s of CPU in every process that builds one: each launch, each host of a
multi-host job, each evaluation or mining run. The result depends only on the directory's files and the
library versions, so it is kept as one JSON file a key, the key a SHA-256 of every file in the directory
that is not a weight file, and the versions of transformers and tokenizers: a changed file or upgraded
library is a different entry, so an entry is never stale. A hit reads the JSON instead and never imports
transformers.

Where: ``$MMRET_CACHE_DIR/tokenizers`` (default ``$XDG_CACHE_HOME/mmret``, else ``~/.cache/mmret``);
``MMRET_CACHE_DIR=off`` turns it off. A cache that cannot be written, or an entry that cannot be read, is
skipped with a warning: the cache never fails a run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from mmret.atomic_dir import write_atomic

log = logging.getLogger(__name__)

#: Files that cannot change the tokenizer (weights), left out of the key: hashing them would cost more than
#: loading the tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".ckpt", ".npz", ".npy")
ENV = "MMRET_CACHE_DIR"

Backend = tuple[str, int | None]


def cache_dir() -> Path | None:
    """The tokenizer cache's directory, or None when ``MMRET_CACHE_DIR=off``."""
    root = os.environ.get(ENV)
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "mmret")
    if root.strip().lower() in ("off", "0", "false", "none", ""):
        return None
    return Path(root).expanduser() / "tokenizers"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cache_key(model_dir: Path) -> str:
    """SHA-256 of the directory's non-weight files (names and bytes) and the versions of transformers and
    tokenizers."""
    h = hashlib.sha256()
    h.update(f"transformers={_version('transformers')};tokenizers={_version('tokenizers')}\n".encode())
    for p in sorted(model_dir.iterdir()):
        if not p.is_file() or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cached_backend(model_dir: Path, load: Callable[[Path], Backend]) -> Backend:
    """``load(model_dir)`` (the backend JSON and the pad id), read from the cache when an entry for the
    directory's files exists, else computed and written there."""
    root = cache_dir()
    if root is None:
        return load(model_dir)
    entry = root / f"{cache_key(model_dir)}.json"
    if entry.is_file():
        try:
            stored = json.loads(entry.read_text(encoding="utf-8"))
            return stored["backend"], stored["pad_token_id"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable tokenizer cache entry (%s); loading %s again", entry, e, model_dir)
    backend = load(model_dir)
    record = {"backend": backend[0], "pad_token_id": backend[1], "source": str(model_dir)}
    try:
        write_atomic(entry, json.dumps(record).encode("utf-8"))
    except OSError as e:
        log.warning("%s: cannot write the tokenizer cache (%s); set %s=off to skip it", entry, e, ENV)
    return backend
