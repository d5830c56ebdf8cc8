"""MM-Embed's recipe (modality-aware hard negatives, continual fine-tuning): ../shared/RECIPES.md s.4.

    python -m mmret.launch --config=configs/mmembed.py --workdir=DIR \
        --config.model.hf_dir=/path/to/Qwen2-VL-7B-Instruct --config.data.root=/path/to/M-BEIR \
        --config.stages.continual.overrides.data.root=/path/to/msmarco   # a BEIR-layout text-retrieval set
    python -m mmret.launch --config=configs/mmembed.py:demo --workdir=DIR   # tiny model, synthetic data
    python -m mmret.launch --config=configs/mmembed.py:zeroshot --workdir=ZS --mode=rerank --step=0 \
        --config.model.hf_dir=/path/to/Qwen2-VL-7B-Instruct --config.data.root=/path/to/M-BEIR \
        --config.rerank.retrieval=RUN/hardneg/eval/<step>/local              # zero-shot reranking, top 10

Stages, each in ``DIR/<stage>``:

1. ``inbatch``: the retriever trained on M-BEIR with in-batch (random) negatives.
2. ``hardneg``: retrained FROM THE PRE-TRAINED MODEL (no ``init_from``) with modality-aware hard negatives
   mined by the ``inbatch`` model: of its top 50 on the union training pool, kind a = candidates whose modality
   differs from the task's target (against modality bias), kind b = target-modality candidates ranked beyond
   45 (closer ranks are skipped as likely false negatives), half and half (``mining.*``).
3. ``continual``: continual fine-tuning from ``hardneg`` on a BEIR-layout text-retrieval set (the stage's
   ``data``) mixed with M-BEIR (``data.mix``) at learning rate 2e-5.

MM-Embed's training code is not public (RECIPES.md s.4): the rules above come from the paper; the backbone
(Qwen2-VL here, LLaVA-NeXT there), the number of negatives (4), the mix weights (1:1), the per-stage epochs
and the stage-1/2 learning rates are mmret's choices, stated here, where the paper gives none. The
text-retrieval source trains without mined negatives (mining reads M-BEIR layouts only). The embedding
and loss are U-MARVEL's stage-3 settings (configs/umarvel.py: bidirectional attention, mean pooling
without the instruction, learnable temperature).
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
PRESETS = (None, "demo", "zeroshot", "zeroshot_demo")


def _zeroshot(umarvel, demo: bool) -> ml_collections.ConfigDict:
    """MM-Embed's zero-shot reranking: an off-the-shelf MLLM (the model source, untrained: ``--step=0``) asked
    whether the candidate matches the query, True or False; its P(True) alone reorders the retriever's top 10.
    (MM-Embed prompts LLaVA-NeXT; here the model source's backbone.)"""
    c = umarvel.get_config("mbeir_demo" if demo else "mbeir")
    c.unlock()
    c.task = "reranker"
    c.lora.rank = 0  # nothing trains
    c.grad_cache_chunk = None  # a reranker config has no GradCache (the retriever's preset it starts from has)
    c.rerank.update(prompt="mmembed", top_k=10, cosine=False, weight=1.0)
    if demo:
        c.rerank.update(max_length=320, max_patches=8 * 2 * 64)
    c.lock()
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"configs/mmembed.py: unknown preset {arg!r} (known: demo, zeroshot, zeroshot_demo)")
    umarvel = _umarvel()
    if arg in ("zeroshot", "zeroshot_demo"):
        return _zeroshot(umarvel, demo=arg == "zeroshot_demo")
    c = umarvel.get_config("mbeir_demo" if arg == "demo" else "mbeir")  # M-BEIR, U-MARVEL's embedding and loss
    c.unlock()
    c.optimizer.learning_rate = 1e-3 if arg == "demo" else 1e-4
    per_host = umarvel.DEVICES_PER_HOST
    negatives = 4
    if arg == "demo":
        hardneg_pipeline = dict(
            batch_size=16,
            num_negatives=negatives,
            max_query_length=96,
            max_candidate_length=96,
            max_query_patches=16 * 64,
            max_candidate_patches=16 * (1 + negatives) * 64,
            **umarvel.demo_packing((7,), (24,)),
        )
        text_root, chunk = "/tmp/mmret_demo/pairs/beir", 16
    else:
        # packing: benchmarks/packing.py --chunk 136 --negatives 4 --multiple 8 --row_length 1024
        packing = (
            umarvel._packing((40, 48), (122592, 133152)),
            umarvel._packing((168, 176, 184, 200), (391712, 409376, 442560, 497920)),
        )
        hardneg_pipeline = umarvel._pipeline(17 * per_host, negatives=negatives, packing=packing)
        text_root, chunk = ml_collections.FieldReference(None, field_type=str), 17 * per_host  # the plain step
    mining = dict(rule="mmembed", negatives=negatives, top_k=50, modality_top=50, rank_cut=45, modality_share=0.5)
    c.stages = ml_collections.ConfigDict(
        dict(
            inbatch=dict(overrides=dict()),
            hardneg=dict(
                mine_from="inbatch",  # mined by stage 1; trained from the pre-trained model again
                overrides=dict(mining=mining, data=dict(pipeline=hardneg_pipeline), grad_cache_chunk=chunk),
            ),
            continual=dict(
                init_from="hardneg",
                overrides=dict(
                    data=dict(
                        layout="beir",
                        root=text_root,
                        weight=1.0,
                        mix=ml_collections.ConfigDict(dict(mbeir=dict(root=c.data.get_ref("root"), weight=1.0))),
                    ),
                    optimizer=dict(learning_rate=2e-5 if arg is None else 2e-4),
                ),
            ),
        ),
        sort_keys=False,
    )
    if arg == "demo":
        c.optimizer.total_steps = 200
        c.stages.hardneg.overrides.optimizer = dict(total_steps=100)
        c.stages.continual.overrides.optimizer.total_steps = 60
        c.eval.at_start = False
        c.stages.inbatch.overrides.eval = dict(at_start=True)
    c.lock()
    return c
