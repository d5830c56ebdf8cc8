"""Data sources: each renders its own records into :class:`mmret.data.example.Example` s (see
:mod:`mmret.data.example`). M-BEIR: :mod:`mmret.data.sources.mbeir` (its stores in :mod:`mmret.data.stores`).

The other layouts (``data.layout``, :func:`open_source`) are read whole into a :class:`SourceStore`, one
module each: ``nli`` (:mod:`~mmret.data.sources.nli`, SimCSE's ``nli_for_simcse.csv``), ``caption``
(:mod:`~mmret.data.sources.caption`, LLaVA's CC3M-595K ``chat.json`` and ``images/``) and ``beir``
(:mod:`~mmret.data.sources.beir`, ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``). Their ids
start with the layout's name (``nli:``, ``caption:``, ``beir:``), so they never meet M-BEIR's
``<dataset>:<n>`` ids in a mixed batch; ``Example.task`` is the layout's name.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence

from etils import epath
from PIL import Image

from mmret.atomic_dir import PathLike, as_path
from mmret.data.bad_records import BadRecords
from mmret.data.example import Example, Part
from mmret.data.images import load_image
from mmret.data.negatives import read_negatives

#: Layout -> the module that reads it (each has ``open_root(root, *, split, bad, negatives_file)``).
LAYOUTS: dict[str, str] = {
    "nli": "mmret.data.sources.nli",
    "caption": "mmret.data.sources.caption",
    "beir": "mmret.data.sources.beir",
}


class SourceStore:
    """A :class:`~mmret.data.stores.Store` over examples already rendered: ``queries`` are the
    :class:`Example` s themselves (no instruction to draw: ``seed`` and ``epoch`` change nothing),
    ``candidates`` maps an id to its :class:`Part`, images are read from inside ``root`` with the decode
    cap (:func:`~mmret.data.images.load_image`). Everything is held in memory; picklable (grain workers
    get a copy)."""

    def __init__(
        self,
        root: PathLike,
        queries: Sequence[Example],
        candidates: Mapping[str, Part],
        *,
        negatives_file: PathLike | None = None,
        bad: BadRecords,
    ) -> None:
        self.root = as_path(root)
        self.queries: Sequence[Example] = queries
        self.candidates: Mapping[str, Part] = candidates
        self.negatives: Mapping[str, tuple[str, ...]] | None = None
        if negatives_file is not None:
            path = as_path(negatives_file)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file (data.negatives_file, the hard negatives of {root})")
            self.negatives = read_negatives(path, pool=candidates, bad=bad)

    def query_example(self, record: Example, *, seed: int, epoch: int = 0) -> Example:
        """``record`` (one of ``queries``) as it is."""
        return record

    def candidate_part(self, cid: str) -> Part:
        """The candidate ``cid`` (``KeyError`` when the store has none)."""
        return self.candidates[cid]

    def image(self, key: str, *, max_pixels: int) -> Image.Image:
        """The RGB image at ``key`` under the root (:class:`~mmret.data.images.BadImageError` when bad)."""
        return load_image(self.root, key, max_pixels=max_pixels)

    def __repr__(self) -> str:
        n, m = len(self.queries), len(self.candidates)
        return f"{type(self).__name__}({str(self.root)!r}, {n} queries, {m} candidates)"


def require_file(root: PathLike, name: str, layout: str, what: str) -> epath.Path:
    """``root / name``; ``FileNotFoundError`` naming it, the layout and what it holds when absent."""
    root = as_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the data root (data.root, or a data.mix entry's root) is not a directory")
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (a data root of layout {layout!r} holds {what} at {name}; data.layout={layout!r})"
        )
    return path


def train_only(layout: str, split: str) -> None:
    """``ValueError`` unless ``split`` is ``"train"``: the layout is one training file, without splits."""
    if split != "train":
        raise ValueError(f"split={split!r}: a data root of layout {layout!r} has one file, read as split 'train'")


def open_source(
    layout: str, root: PathLike, *, split: str, bad: BadRecords, negatives_file: PathLike | None = None
) -> SourceStore:
    """The store (:class:`mmret.data.stores.Store`) of a non-M-BEIR data root of ``layout``: every record
    read and checked (bad ones through ``bad``), ``negatives_file`` (ids of this store) as its negatives."""
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout={layout!r}: no reader for this layout (readers: {', '.join(LAYOUTS)})")
    module = importlib.import_module(LAYOUTS[layout])
    return module.open_root(root, split=split, bad=bad, negatives_file=negatives_file)
