"""Test-wide settings: 8 simulated CPU devices for sharding tests, no network for Hugging Face, and one
persistent JAX compilation cache for the whole session.

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

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _CACHE = tempfile.mkdtemp(prefix="mmret-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
