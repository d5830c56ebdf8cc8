"""The joint fusion encoder's two-stage schedule: ../shared/RECIPES.md s.5.

    python -m mmret.launch --config=configs/jfe.py --workdir=DIR \
        --config.model.hf_dir=/path/to/Qwen2-VL-7B-Instruct --config.data.root=/path/to/M-BEIR \
        --config.stages.adapt.overrides.data.root=/path/to/cc3m \
        --config.stages.adapt.overrides.data.mix.nli.root=/path/to/nli
    python -m mmret.launch --config=configs/jfe.py:demo --workdir=DIR     # tiny model, synthetic data
    python tools/jfe_ablation.py --workdir=DIR [--preset demo]            # joint vs late fusion, same data

One tower: image and text of a query (or of a candidate) enter the MLLM together and fuse from the first
layer (``encoder.fusion="joint"``); ``encoder.fusion="late"`` is the two-leg baseline (image and text
embedded apart and summed, as UniIR's score fusion) that the ablation compares against. Stages, each in
``DIR/<stage>``:

1. ``adapt`` (post-training adaptation): the generative MLLM becomes an embedder on broad paired data, caption
   pairs (LLaVA's CC3M layout, the stage's ``data``) mixed 1:1 with text pairs (SimCSE's NLI csv,
   ``data.mix``), symmetric InfoNCE, no instructions.
2. ``instruct`` (instruction tuning) from ``adapt``: M-BEIR with its instructions (the top level).

The paper gives the schedule, not its numbers: the learning rates, epochs and mix are mmret's choices
(U-MARVEL's stage-2 and stage-3 values, configs/umarvel.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def _umarvel():
    spec = importlib.util.spec_from_file_location("mmret_configs_umarvel", Path(__file__).with_name("umarvel.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The ``:arg`` presets (None: the paper's).
PRESETS = (None, "demo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Presets: none (the paper schedule on Qwen2-VL-7B) and ``demo`` (tiny model, synthetic data)."""
    if arg not in PRESETS:
        raise ValueError(f"configs/jfe.py: unknown preset {arg!r} (known: demo)")
    umarvel = _umarvel()
    c = umarvel.get_config("mbeir_demo" if arg == "demo" else "mbeir")
    c.unlock()
    demo = arg == "demo"
    pairs = "/tmp/mmret_demo/pairs" if demo else None
    caption_root = ml_collections.FieldReference(f"{pairs}/caption" if demo else None, field_type=str)
    nli_root = ml_collections.FieldReference(f"{pairs}/nli" if demo else None, field_type=str)
    if demo:
        pipeline = dict(
            batch_size=64,
            max_query_length=96,
            max_candidate_length=96,
            max_query_patches=64,
            max_candidate_patches=64 * 64,
        )
    else:
        pipeline = umarvel._pipeline(60 * umarvel.DEVICES_PER_HOST, length=400, query_patches=4)
    c.stages = ml_collections.ConfigDict(
        dict(
            adapt=dict(
                overrides=dict(
                    data=dict(
                        layout="caption",
                        root=caption_root,
                        weight=1.0,
                        mix=ml_collections.ConfigDict(dict(nli=dict(root=nli_root, layout="nli", weight=1.0))),
                        pipeline=pipeline,
                    ),
                    temperature=dict(learnable=False),
                    symmetric=True,
                    optimizer=dict(learning_rate=1e-3 if demo else 1e-4),
                ),
            ),
            instruct=dict(init_from="adapt", overrides=dict()),
        ),
        sort_keys=False,
    )
    if demo:
        c.stages.adapt.overrides.optimizer.total_steps = 60
        c.optimizer.total_steps = 200
        c.eval.at_start = False
    c.lock()
    return c
