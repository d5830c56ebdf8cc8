#!/usr/bin/env python
"""Write a seeded random-weight Hugging Face model directory of a registered backbone, offline.

    python tools/make_tiny_model.py --out DIR [--family qwen2_vl] [--preset tiny|small] [--seed N] [--untied] [--force]

``--family`` is the backbone's Hugging Face ``model_type`` (default: the one defining ``--preset``, else
qwen2_vl); ``--preset`` one of its test presets (default: its first). DIR gets the preset's ``config.json``
(hub layout, see the backbone's presets), ``model.safetensors`` + ``generation_config.json`` (from
``save_pretrained`` of the backbone's transformers class) and the backbone's offline tokenizer and
processor files. For qwen2_vl: the real Qwen2 tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) and ``preprocessor_config.json``; it loads with
``Qwen2VLForConditionalGeneration.from_pretrained(DIR)``, the processor with
``mmret.models.qwen2_vl.processor_files.load_processor`` (``AutoProcessor`` needs torchvision).

The directory is written next to DIR under a temporary name and renamed into place, so DIR is either
absent, the old contents (with ``--force``) or complete. Needs torch (the ``torch`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(_REPO_ROOT))

from mmret.atomic_dir import atomic_output_dir  # noqa: E402
from mmret.models import registry  # noqa: E402
from mmret.models.backbone import Backbone  # noqa: E402


def materialisable_presets() -> dict[str, str]:
    """Presets small enough to materialise with random weights -> their backbone's model_type (the other
    presets only describe shapes)."""
    return {name: t for t in registry.names() for name in registry.get(t).test_presets}


class UsageError(Exception):
    """A problem with the command line or the output path (reported without a traceback)."""


def _write_weights(tmp: Path, spec: Backbone, config_dict: dict[str, Any], seed: int) -> None:
    """Build the backbone's transformers model with torch seeded to ``seed`` and save it (safetensors)."""
    try:
        import torch
        import transformers

        from mmret.models.reference import transformers_model
    except ImportError as e:  # torch is an optional dependency of mmret
        raise UsageError(f"this tool needs torch and transformers ({e}); install mmret[torch]") from e

    transformers.utils.logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers_model(spec, config_dict).to(torch.float32).eval()
    model.save_pretrained(tmp, safe_serialization=True)


def resolve(family: str | None, preset: str | None) -> tuple[Backbone, str]:
    """The backbone and test preset the command line names (see the module docstring)."""
    known = materialisable_presets()
    if family is not None and family not in registry.names():
        raise UsageError(f"--family {family!r}: choose one of {list(registry.names())}")
    if preset is not None and preset not in known:
        raise UsageError(f"--preset {preset!r}: choose one of {sorted(known)}")
    family = family or (known[preset] if preset is not None else registry.DEFAULT_MODEL_TYPE)
    spec = registry.get(family)
    preset = preset or (spec.test_presets[0] if spec.test_presets else None)
    if preset is None or preset not in spec.test_presets:
        raise UsageError(f"--family {family}: --preset must be one of {list(spec.test_presets)}")
    return spec, preset


def write_model_dir(
    out: str | Path,
    preset: str | None = None,
    seed: int = 0,
    force: bool = False,
    family: str | None = None,
    *,
    untied: bool = False,
    vocab_size: int | None = None,
) -> Path:
    """Write a random-weight directory of ``family``'s ``preset`` at ``out`` (atomically); return its path.
    ``untied``: an LM head of its own (``tie_word_embeddings`` false, as the 7B sizes) instead of the preset's;
    ``vocab_size``: token rows instead of the preset's (e.g. the tokenizer's own size, so added tokens grow it)."""
    spec, preset = resolve(family, preset)
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    if spec.write_processor_files is None:
        raise UsageError(f"--family {spec.model_type}: the backbone has no offline tokenizer / processor files")
    out = Path(out).absolute()
    with atomic_output_dir(out, force=force) as tmp:
        config_dict = spec.preset_config(preset)
        config_dict["torch_dtype"] = "float32"  # what is saved
        for holder in (config_dict, config_dict.get("text_config")):
            if isinstance(holder, dict):
                if untied:
                    holder["tie_word_embeddings"] = False
                if vocab_size is not None and "vocab_size" in holder:
                    holder["vocab_size"] = vocab_size
        _write_weights(tmp, spec, config_dict, seed)
        # Our config.json replaces the transformers-5 one: same model, hub layout (flat text keys).
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
        spec.write_processor_files(tmp, config_dict)
        for path in tmp.iterdir():  # save_pretrained leaves model.safetensors at 0600
            path.chmod(0o644)
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a seeded random-weight Hugging Face model directory of a backbone (offline).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (created)")
    parser.add_argument(
        "--family",
        default=None,
        choices=registry.names(),
        help="backbone (Hugging Face model_type; default: the one defining --preset, else "
        f"{registry.DEFAULT_MODEL_TYPE})",
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(materialisable_presets()),
        help="architecture preset (default: the family's first, tiny for qwen2_vl); the real-size presets "
        "only describe shapes",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default 0)")
    parser.add_argument("--untied", action="store_true", help="an LM head of its own (tie_word_embeddings false)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is a non-empty directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parse_args(argv)
    start = time.perf_counter()
    try:
        spec, preset = resolve(args.family, args.preset)
        out = write_model_dir(
            args.out, preset=preset, seed=args.seed, force=args.force, family=spec.model_type, untied=args.untied
        )
    except (UsageError, OSError) as e:
        print(f"make_tiny_model: error: {e}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in out.iterdir())
    print(
        f"wrote {out} (family={spec.model_type}, preset={preset}, seed={args.seed}) "
        f"in {time.perf_counter() - start:.1f}s: " + ", ".join(files)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
