"""Test-wide settings: 8 simulated CPU devices for sharding tests, no network for Hugging Face, one
persistent JAX compilation cache for the whole session, and the session's shared inputs (fixtures below).

The cache: the tiny model's programs (its initialisers, the steps, orbax's per-array slices when it saves)
are compiled again by every process that builds it, and most of the suite's subprocess tests (the
trainer, the launcher, the multi-host workers) spend more time compiling than computing. Every process
of the session (this one and the subprocesses, which inherit the environment) reads and writes one
cache directory, created here before anything imports jax and removed when the session ends; every
compile is written (minimum compile time 0), however short. An executable read from the cache is the
one XLA would have compiled, so nothing a test checks changes, bitwise comparisons included. Set
``JAX_COMPILATION_CACHE_DIR`` to keep a cache between sessions.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The suite's programs are tiny and mostly compiled once, so XLA's compile time outweighs their run time:
# LLVM's optimisation level 0 for the CPU backend (about 40% less compile time), and XLA:CPU's older loop
# emitters instead of its fusion emitters (the tiny model's train step: 1.6-3.2 s to compile instead of
# 5.5-10.7 s, the same loss and the same run time: measured in one session, side by side). Every process of
# the session gets the same flags (``helpers.xla_flags`` for subprocesses that take another device count).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _CACHE = tempfile.mkdtemp(prefix="mmret-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# mmret's tokenizer cache (mmret/data/tokenizer_cache.py), one for the session's processes like the JAX cache:
# the processes that build a Processor of the session's tokenizer files skip importing transformers and torch.
if not os.environ.get("MMRET_CACHE_DIR"):
    _MMRET_CACHE = tempfile.mkdtemp(prefix="mmret-tests-cache-")
    os.environ["MMRET_CACHE_DIR"] = _MMRET_CACHE
    atexit.register(shutil.rmtree, _MMRET_CACHE, ignore_errors=True)


# ------------------------------------------------------------------ inputs shared by the whole session


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _shared(root: Path):
    """Yield ``root``, then fail the session if a test changed, added or removed anything under it."""
    before = _snapshot(root)
    yield root
    assert _snapshot(root) == before, f"{root}: a test changed a shared session input (copy it to change it)"


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory: pytest.TempPathFactory):
    """The Qwen2-VL processor files (``write_processor_files``: tokenizer, chat template, preprocessor
    config), written once per session. Shared: read it, or ``shutil.copytree`` it to add files."""
    from mmret.models.qwen2_vl.processor_files import write_processor_files

    root = tmp_path_factory.mktemp("shared_processor")
    write_processor_files(root)
    yield from _shared(root)


@pytest.fixture(scope="session")
def tiny_mbeir(tmp_path_factory: pytest.TempPathFactory):
    """The tiny synthetic M-BEIR corpus (``write_synthetic_mbeir(scale="tiny", seed=0)``), written once per
    session. Shared: read it, or copy it to break it."""
    from mmret.data.synthetic import write_synthetic_mbeir

    root = tmp_path_factory.mktemp("shared_mbeir") / "mbeir"
    write_synthetic_mbeir(root, scale="tiny", seed=0)
    yield from _shared(root)


# ------------------------------------------------------------------ order: the longest modules first

#: Modules that take longest (their module fixtures train or launch), first in the collection order. ``make test``'s
#: pytest-xdist then hands modules out by their number of tests (its default loadscope reorder); with
#: ``--no-loadscope-reorder`` it would follow this order, which ran the heaviest modules together and measured
#: slower on 2 cores (the same 766 tests: 1,090 s against 947 s; Makefile).
SLOW_FIRST = (
    "test_recipes",
    "test_launch",
    "test_chain",
    "test_multihost",
    "test_checkpoints",
    "test_train_step",
    "test_trainer",
    "test_mining",
    "test_errors",
    "test_sources",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module keeps its own order


# ------------------------------------------------------------------------------ a fake object store


@pytest.fixture
def bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``gs://bucket`` served by epath from a local directory (epath.testing.mock_epath), with the working
    directory an empty one: a local-only call on a ``gs://`` path (``open``, ``np.load``, ``os.rename``)
    would act on ``./gs:/bucket/...`` and is caught there. Yields the directory behind the bucket."""
    from etils.epath import testing

    store, cwd = tmp_path / "bucket", tmp_path / "cwd"
    store.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    prefix = "gs://bucket"

    def local(path: os.PathLike | str) -> str:
        s = os.fspath(path)
        return str(store / s.removeprefix(prefix).lstrip("/")) if s.startswith(prefix) else s

    def remote(path: os.PathLike | str) -> str:
        s = os.fspath(path)
        return prefix + s.removeprefix(str(store)) if s.startswith(str(store)) else s

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, src, dst, *args, **kwargs):
        return original(local(src), local(dst), *args, **kwargs)

    def walk(original, top, **kwargs):
        for root, dirs, files in original(local(top), **kwargs):
            yield remote(root), dirs, files

    def glob(original, pattern):
        return [remote(p) for p in original(local(pattern))]

    names = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")
    with testing.mock_epath(**dict.fromkeys(names, one), rename=two, replace=two, copy=two, walk=walk, glob=glob):
        yield store
    assert os.listdir(cwd) == []  # nothing went through a local-only call
