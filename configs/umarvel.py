"""U-MARVEL, stage 3 (M-BEIR with instructions) on Qwen2-VL-7B-Instruct: ../shared/RECIPES.md s.3.

    python -m mmret.launch --config=configs/umarvel.py --workdir=DIR \
        --config.model.hf_dir=/path/to/Qwen2-VL-7B-Instruct --config.data.root=/path/to/M-BEIR
    python -m mmret.launch --config=configs/umarvel.py:demo --workdir=DIR     # tiny model, synthetic corpus

Presets (the ``:arg`` suffix): none = the paper's stage-3 recipe; ``demo`` = the same code on the tiny
random model and the synthetic M-BEIR corpus (written by tools/make_tiny_model.py and
tools/make_synthetic_mbeir.py), about 12 minutes on 2 CPU cores (about 600 steps at 60-70 examples/s).

Both train from the split's union file, ``query/union_train/mbeir_union_up_train.jsonl`` against
``cand_pool/global/mbeir_union_train_cand_pool.jsonl`` (``data.query_file="auto"``). The paper config states
epochs (the trainer derives the steps from the number of lines it read); the demo a fixed 600 steps. The
loss is U-MARVEL's (no false-negative masking; a symmetric loss would be the sum of both directions):
``mask_false_negatives=True`` switches mmret's masking of a query's other labelled positives in the batch
back on. The reported numbers come from exact search (the reference's); ScaNN
(``eval.search.method="auto"`` or ``"scann"``) is for large pools.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mmret.recipe import SearchConfig

# Paper: 60 sequences per device on 64 devices (~3840 global). data.pipeline.batch_size is per host:
# 8 devices per host -> 480 per host (set it to 60 * local devices on other hosts).
PAPER_BATCH_PER_HOST = 480


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(
        hf_dir=ml_collections.FieldReference(None, field_type=str),
        checkpoint=ml_collections.FieldReference(None, field_type=str),
        preset=ml_collections.FieldReference(None, field_type=str),
        seed=0,
        dtype="bfloat16",
        param_dtype="float32",
        scan_layers=True,
        remat="dots_with_no_batch_dims",
        attention_impl="auto",
    )
    # Bidirectional attention, mean pooling with the instruction (and its markers) left out, L2 norm.
    c.encoder = dict(pooling="mean", attention="bidirectional", fusion="joint", normalize=True)
    c.temperature = dict(init=0.05, learnable=True, min=0.01, max=1.0)
    c.lora = dict(rank=128, alpha=256.0, dropout=0.05, lora_only=True)
    # U-MARVEL's loss: every other in-batch candidate is a negative; a symmetric loss is the sum of both ways.
    c.mask_false_negatives = False
    c.symmetric_reduction = "sum"
    c.freeze = (r"(.*\.)?visual\..*",)  # vision tower and merger frozen
    c.data = dict(
        root=ml_collections.FieldReference(None, field_type=str),
        format="raw",
        split="train",
        query_file="auto",  # the union file: query/union_train/mbeir_union_up_train.jsonl (1.33M lines)
        negatives_file=ml_collections.FieldReference(None, field_type=str),
        processor=dict(template="umarvel", max_pixels=300 * 28 * 28, max_text_tokens=480),
        pipeline=dict(
            batch_size=PAPER_BATCH_PER_HOST,
            num_negatives=0,
            max_query_length=800,
            max_candidate_length=800,
            max_query_patches=PAPER_BATCH_PER_HOST * 1200,
            max_candidate_patches=PAPER_BATCH_PER_HOST * 1200,
            num_workers=8,
            on_bad_record="skip",
        ),
    )
    # One epoch: steps = lines of the union file // global batch (1.33M / 3840 = 346 on 8 hosts of 8 devices).
    c.epochs = ml_collections.FieldReference(1.0, field_type=float)
    c.optimizer = dict(learning_rate=4e-4, warmup_ratio=0.03, weight_decay=0.0)
    c.grad_cache_chunk = 60
    c.mesh = dict(data=-1, fsdp=8, tensor=1)
    c.log_every = 10
    c.checkpoint = dict(every=500, keep=3)
    # M-BEIR test evaluation (--mode=eval, or eval.at_end): the 16 tasks, local and global pools.
    c.eval = dict(
        root=ml_collections.FieldReference(None, field_type=str),  # default: data.root
        pools=("local", "global"),
        batch_size=0,  # 0: data.pipeline.batch_size
        shard_size=65536,
        num_workers=8,
        at_start=False,
        at_end=False,
        check_exact=1000,  # queries per task on which ScaNN's Recall@k is compared with exact search (ScaNN only)
        on_bad_record="error",  # a test query whose positive is not in its local pool stops the evaluation
        # ScaNN / exact search (mmret/eval/index.py); None fields scale with the pool size. Exact search, as the
        # reference evaluation (UniIR's FAISS Flat, U-MARVEL's topk), for the reported numbers.
        search={
            f.name: ml_collections.FieldReference(None, field_type=int) if v is None else v
            for f in dataclasses.fields(SearchConfig)
            for v in [getattr(SearchConfig(), f.name)]
        },
    )
    c.eval.search.method = "exact"

    if arg == "demo":
        c.model.hf_dir = "/tmp/mmret_demo/tiny_model"
        c.model.dtype = "float32"
        c.model.remat = "none"
        c.model.attention_impl = "xla"
        # The tiny model is random: there is nothing for adapters to adapt, so the demo trains every
        # weight, the vision tower included (LoRA, freezing and merging are covered by the tests).
        c.lora.rank = 0
        c.freeze = ()
        c.data.root = "/tmp/mmret_demo/mbeir"
        c.data.processor.max_pixels = 64 * 28 * 28
        c.data.processor.max_text_tokens = 64
        # 64 queries per step: in-batch negatives from 63 others. On the `demo` corpus scale (128 training
        # queries per task) 400 steps of 64 lifted the 16-task averages from 27.9 (local) / 16.0 (global) at
        # 600 steps of 32 to 41.7 / 27.1 (benchmarks/RESULTS.md); 200 steps of 128 gave 25.5 / 15.5. With the
        # board tasks' doubled training split (2,560 queries), 600 steps: 53.0 / 34.6; 400 steps: 37.1 / 21.2.
        c.data.pipeline.update(
            batch_size=64,
            max_query_length=96,  # the synthetic corpus's longest input is 83 tokens
            max_candidate_length=96,
            max_query_patches=64 * 64,  # its images are at most 64 patches (16 image tokens)
            max_candidate_patches=64 * 64,
            num_workers=0,
            on_bad_record="error",
        )
        c.optimizer.learning_rate = 1e-3
        c.epochs = None  # a fixed length: 600 steps of 64 are ~11.5 epochs of the demo corpus's 3,328-line union file
        c.optimizer.total_steps = 600
        c.grad_cache_chunk = 32
        c.mesh = dict(data=-1, fsdp=1, tensor=1)
        c.log_every = 25
        c.checkpoint = dict(every=200, keep=2)
        c.eval.update(shard_size=4096, num_workers=0, at_start=True, at_end=True, check_exact=0)
    elif arg:
        raise ValueError(f"configs/umarvel.py: unknown preset {arg!r} (known: demo)")
    c.lock()
    return c
