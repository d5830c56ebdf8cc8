"""Small helpers shared by several test files (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WORDS = "red blue green circle square star left right small large".split()


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` as a module (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_pairs(proc, n: int, seed: int = 0) -> tuple[list, list]:
    """``n`` processed queries and ``n`` candidates: 5 random words each, a random 56x56 image on
    every other one (queries at even indices, candidates at odd), from one seeded generator."""
    rng = np.random.default_rng(seed)

    def example(i: int):
        img = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) if i % 2 == 0 else None
        return proc(text=" ".join(rng.choice(WORDS, 5)), image=img)

    return [example(i) for i in range(n)], [example(i + 1) for i in range(n)]
