"""Data sources: each renders its own records into :class:`mmret.data.example.Example` s (see
:mod:`mmret.data.example`). M-BEIR: :mod:`mmret.data.sources.mbeir` (its stores in :mod:`mmret.data.stores`)."""

from __future__ import annotations

from typing import Any

from mmret.atomic_dir import PathLike
from mmret.data.bad_records import BadRecords


def open_source(
    layout: str, root: PathLike, *, split: str, bad: BadRecords, negatives_file: PathLike | None = None
) -> Any:
    """The store (:class:`mmret.data.stores.Store`) of a non-M-BEIR data root of ``layout``."""
    raise ValueError(f"data.layout={layout!r}: no reader for this layout yet")
