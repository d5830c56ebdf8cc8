#!/usr/bin/env python
"""Write a seeded random-weight Hugging Face Qwen2-VL model directory, offline.

    python tools/make_tiny_model.py --out DIR [--preset tiny|small] [--seed N] [--force]

DIR gets ``config.json`` (hub Qwen2-VL layout, see ``mmret.models.qwen2_vl.presets``),
``model.safetensors`` + ``generation_config.json`` (from ``save_pretrained``), the real Qwen2 tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) and ``preprocessor_config.json``.
It loads with ``Qwen2VLForConditionalGeneration.from_pretrained(DIR)``; for the processor see
``mmret.models.qwen2_vl.processor_files.load_processor`` (``AutoProcessor`` needs torchvision).

The directory is written next to DIR under a temporary name and renamed into place, so DIR is either
absent, the old contents (with ``--force``) or complete. Needs torch (the ``torch`` extra).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from mmret.atomic_dir import atomic_output_dir  # noqa: E402
from mmret.models.qwen2_vl.presets import hf_config  # noqa: E402
from mmret.models.qwen2_vl.processor_files import write_processor_files  # noqa: E402

#: Presets small enough to materialise with random weights (the others only describe shapes).
MATERIALISABLE_PRESETS = ("tiny", "small")


class UsageError(Exception):
    """A problem with the command line or the output path (reported without a traceback)."""


def _write_weights(tmp: Path, config_dict: dict[str, Any], seed: int) -> None:
    """Build the model with torch seeded to ``seed`` and save it (safetensors) into ``tmp``."""
    try:
        import torch
        import transformers
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    except ImportError as e:  # torch is an optional dependency of mmret
        raise UsageError(f"this tool needs torch and transformers ({e}); install mmret[torch]") from e

    transformers.utils.logging.disable_progress_bar()
    config = Qwen2VLConfig(**copy.deepcopy(config_dict))  # it edits nested dicts (rope_scaling) in place
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(tmp, safe_serialization=True)


def write_model_dir(out: str | Path, preset: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Write a random-weight Qwen2-VL directory for ``preset`` at ``out`` (atomically); return its path."""
    if preset not in MATERIALISABLE_PRESETS:
        raise UsageError(f"--preset {preset!r}: choose one of {list(MATERIALISABLE_PRESETS)}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    out = Path(out).absolute()
    with atomic_output_dir(out, force=force) as tmp:
        config_dict = hf_config(preset)
        config_dict["torch_dtype"] = "float32"  # what is saved
        _write_weights(tmp, config_dict, seed)
        # Our config.json replaces the transformers-5 one: same model, hub layout (flat text keys).
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
        vision = config_dict["vision_config"]
        write_processor_files(
            tmp,
            patch_size=vision["patch_size"],
            temporal_patch_size=vision["temporal_patch_size"],
            merge_size=vision["spatial_merge_size"],
        )
        for path in tmp.iterdir():  # save_pretrained leaves model.safetensors at 0600
            path.chmod(0o644)
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a seeded random-weight Hugging Face Qwen2-VL model directory (offline).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=MATERIALISABLE_PRESETS,
        help="architecture preset (default: tiny); the real-size presets only describe shapes",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default 0)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is a non-empty directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parse_args(argv)
    start = time.perf_counter()
    try:
        out = write_model_dir(args.out, preset=args.preset, seed=args.seed, force=args.force)
    except (UsageError, OSError) as e:
        print(f"make_tiny_model: error: {e}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in out.iterdir())
    print(
        f"wrote {out} (preset={args.preset}, seed={args.seed}) in {time.perf_counter() - start:.1f}s: "
        + ", ".join(files)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
