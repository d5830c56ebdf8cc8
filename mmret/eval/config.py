"""What an evaluation reads: the ``eval`` section of a trainer config (no heavy imports here)."""

from __future__ import annotations

import dataclasses
from typing import get_args

from mmret.data.bad_records import OnBadRecord
from mmret.data.images import DEFAULT_MAX_PIXELS
from mmret.eval.index import SearchConfig

POOLS = ("local", "global")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Embedding and search settings; 0 / None fields fall back to the training config's values.

    ``root``: the M-BEIR root (default ``data.root``). ``batch_size`` is per host (default the
    training ``data.pipeline.batch_size``); ``max_length`` is per sequence and ``max_patches`` per
    batch (defaults: the training pipeline's larger query/candidate values, patches scaled to the
    batch). ``shard_size``: embeddings per shard file, the unit of resumption. ``top``: ranks kept in
    the TREC run files. ``at_start`` / ``at_end``: evaluate the model before and after training
    (``mmret.launch`` in train mode). ``check_exact``: queries sampled per task (all of a task's when
    fewer) on which a ScaNN index is compared with exact search: the task's headline Recall@k with each,
    and the neighbour recall@10; in the report (0: not measured, and the report says so). Exact search of
    the samples costs ``16 * check_exact`` queries against the global pool. ``on_bad_record``: a bad
    test record (e.g. a query whose own-dataset positive is not in its local pool) stops the run
    (``"error"``) or is skipped and counted (``"skip"``: the report lists the skips and is not complete).
    """

    root: str | None = None
    split: str = "test"
    tasks: tuple[str, ...] | None = None  # None: the 16 evaluated dataset-tasks
    pools: tuple[str, ...] = POOLS
    batch_size: int = 0
    max_length: int = 0
    max_patches: int = 0
    shard_size: int = 4096
    num_workers: int = 0
    max_decode_pixels: int = DEFAULT_MAX_PIXELS
    instruction_seed: int = 0
    top: int = 50
    at_start: bool = False
    at_end: bool = False
    check_exact: int = 0
    on_bad_record: str = "error"
    search: SearchConfig = SearchConfig()

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "max_patches", "check_exact"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("shard_size", "top"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name} must be positive, got {getattr(self, name)}")
        if self.on_bad_record not in get_args(OnBadRecord):
            raise ValueError(f"eval.on_bad_record must be one of {get_args(OnBadRecord)}, got {self.on_bad_record!r}")
        bad = [p for p in self.pools if p not in POOLS]
        if bad or not self.pools:
            raise ValueError(f"eval.pools must be a non-empty subset of {POOLS}, got {self.pools}")
