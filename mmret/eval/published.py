"""Published M-BEIR numbers, the bar to reach: RECIPES.md s.2 (from the UniIR, MM-Embed, LamRA and
U-MARVEL papers), as data.

All numbers are percentages; per task the headline Recall@k (k = 5, 10 for Fashion200K and FashionIQ)
on the local pools; an average is the plain mean over the 16 dataset-tasks. ``None`` = not published.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mmret.data.mbeir import EVAL_TASKS
from mmret.recipe import POOLS


def _per_task(values: tuple[float, ...]) -> Mapping[str, float]:
    """The 16 headline numbers, given in paper order (:data:`~mmret.data.mbeir.EVAL_TASKS`), by task name."""
    if len(values) != len(EVAL_TASKS):
        raise ValueError(f"expected {len(EVAL_TASKS)} per-task numbers, got {len(values)}")
    return MappingProxyType({t.name: v for t, v in zip(EVAL_TASKS, values, strict=True)})


@dataclass(frozen=True)
class PublishedSystem:
    """One row of the published table; ``local`` holds the per-task local numbers where known."""

    name: str
    backbone: str
    local_avg: float | None
    global_avg: float | None
    reranked: bool = False
    local: Mapping[str, float] | None = None

    def average(self, pool: str) -> float | None:
        """The published average for ``pool`` ("local" or "global")."""
        if pool not in POOLS:
            raise ValueError(f"pool must be 'local' or 'global', got {pool!r}")
        return self.local_avg if pool == "local" else self.global_avg


UNIIR_CLIP_SF = PublishedSystem(
    "UniIR CLIP_SF",
    "CLIP-L",
    50.6,
    48.9,
    local=_per_task((42.6, 81.1, 18.0, 84.7, 59.4, 78.7, 43.1, 92.3, 18.3, 32.0, 45.5, 27.9, 24.4, 44.6, 67.6, 48.9)),
)
U_MARVEL = PublishedSystem(
    "U-MARVEL",
    "Qwen2-VL-7B",
    63.2,
    60.7,
    local=_per_task((47.3, 84.4, 33.6, 97.1, 78.8, 88.5, 47.3, 93.5, 35.1, 34.2, 62.5, 58.3, 36.4, 60.7, 79.4, 74.7)),
)

#: Every system of the table, by name.
SYSTEMS: Mapping[str, PublishedSystem] = MappingProxyType(
    {
        s.name: s
        for s in (
            UNIIR_CLIP_SF,
            PublishedSystem("UniIR BLIP_FF", "BLIP", 46.8, 45.5),
            PublishedSystem("MM-Embed", "LLaVA-NeXT (Mistral-7B, NV-Embed LLM)", None, 52.7),
            PublishedSystem("LamRA-Ret", "Qwen2-VL-7B", 56.6, 54.9),
            PublishedSystem("LamRA", "Qwen2-VL-7B", 63.7, 61.4, reranked=True),
            U_MARVEL,
            PublishedSystem("U-MARVEL+", "Qwen2-VL-7B", 64.8, 61.8, reranked=True),
        )
    }
)
