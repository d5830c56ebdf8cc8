"""U-MARVEL's progressive transition on Qwen2-VL-7B-Instruct: ../shared/RECIPES.md s.3.

    python -m mmret.launch --config=configs/umarvel.py --workdir=DIR \
        --config.model.hf_dir=/path/to/Qwen2-VL-7B-Instruct --config.data.root=/path/to/M-BEIR \
        --config.stages.text.overrides.data.root=/path/to/nli     # holds nli_for_simcse.csv
        --config.stages.caption.overrides.data.root=/path/to/cc3m # chat.json + images/ (LLaVA CC3M-595K)
    python -m mmret.launch --config=configs/umarvel.py:demo --workdir=DIR     # the chain, tiny model, synthetic data

Presets (the ``:arg`` suffix):

- none: the chain of stages 1-4, each in ``DIR/<stage>``: ``text`` (NLI pairs) -> ``caption`` (caption ->
  image, symmetric) -> ``mbeir`` (M-BEIR with instructions, learnable temperature) -> ``hardneg`` (5 negatives
  per query mined by the ``mbeir`` model: U-MARVEL's rule on the union training pool). Each stage starts
  from the one before, LoRA merged. Then ``reranker``: U-MARVEL's Yes/No reranker, from the base model, on
  the ``mbeir`` model's local top-100 lists (``--mode=rerank`` with its run reranks a retrieval run). Then
  ``distill`` (stage 5): the ``hardneg`` model's local top 50 of 10% of the training queries, rescored by the
  reranker, distilled into the ``hardneg`` model (:mod:`mmret.distill.teacher`, :mod:`mmret.tasks.distill`).
- ``mbeir``: stage 3 alone (one run in ``DIR``), from the model source.
- ``demo``: the same chain on the tiny random model and synthetic data (tools/make_tiny_model.py,
  tools/make_synthetic_mbeir.py, tools/make_synthetic_pairs.py), every retriever stage evaluated: what the
  README's first command runs.
- ``mbeir_demo``: stage 3 alone on the tiny model (600 steps; benchmarks/RESULTS.md's demo table).
- ``qwen3vl_4b``: the chain for U-MARVEL's Qwen3-VL-4B run (``--config.model.hf_dir=/path/to/Qwen3-VL-4B-Instruct``):
  the same stages and settings (RECIPES.md s.3: "the same stages"), images capped at 300 visual tokens as on
  Qwen2-VL, which is 300 * 32 * 32 pixels at Qwen3-VL's 16-pixel patches (the patch rows per image, 1,200, stay).

The top-level fields are stage 3's (and every stage's defaults); a stage's ``overrides`` change what
differs in it (the table of RECIPES.md s.3: data, LoRA rank, per-device batch, learning rate, epochs,
temperature, loss). Batches are per host: the paper's per-device batch times 8 devices per host (set
``data.pipeline.batch_size`` and ``grad_cache_chunk`` for other hosts). Every stage trains from its data's
size (``epochs``). The loss is U-MARVEL's (no false-negative masking; symmetric = the sum of both ways);
the reported numbers come from exact search (the reference's).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mmret.recipe import SearchConfig

DEVICES_PER_HOST = 8
# Paper: 60 sequences per device on 64 devices (~3840 global), per host: 480.
PAPER_BATCH_PER_HOST = 60 * DEVICES_PER_HOST


def _pipeline(
    batch: int,
    negatives: int = 0,
    length: int = 800,
    query_patches: int = 1200,
    patches: int = 1200,
    packing: tuple[dict, dict] | None = None,
) -> dict:
    """A paper pipeline of ``batch`` queries per host, each with one positive and ``negatives`` negatives;
    ``query_patches`` / ``patches``: the patch budget per query / candidate (1200 = 300 visual tokens);
    ``packing``: the query and candidate sides' packing (:func:`_packing`)."""
    out = dict(
        batch_size=batch,
        num_negatives=negatives,
        max_query_length=length,
        max_candidate_length=length,
        max_query_patches=batch * query_patches,
        max_candidate_patches=batch * (1 + negatives) * patches,
    )
    if packing is not None:
        out.update(query_packing=packing[0], candidate_packing=packing[1])
    return out


def _packing(rows: tuple[int, ...], patches: tuple[int, ...], row_length: int = 1024) -> dict:
    """Sequence packing (mmret.data.packing): rows of ``row_length`` tokens, the buckets (rows, patch rows) a host
    batch may take. The paper stages' buckets are benchmarks/packing.py's for their shapes on its M-BEIR, NLI and
    CC3M length models (30th, 60th, 90th and 105% of the 100th percentile, multiples of 8 devices; 86-94% of the
    computed tokens real, against 17-45% padded: benchmarks/RESULTS.md)."""
    return dict(rows=rows, patches=patches, row_length=row_length)


#: Stage 3's packing (480 queries and 480 candidates per host, rows of 1,024): benchmarks/packing.py --chunk 480
#: --multiple 8 --row_length 1024.
MBEIR_PACKING = (
    _packing((128, 136, 144), (401312, 420192, 450464)),
    _packing((120, 128, 136), (277760, 298176, 324736)),
)


def _stages() -> ml_collections.ConfigDict:
    """The paper's stages 1, 2 and 4 as overrides of stage 3 (the top level)."""
    per_host = DEVICES_PER_HOST

    def root() -> ml_collections.FieldReference:  # the stage's own data root, set on the command line
        return ml_collections.FieldReference(None, field_type=str)

    text = dict(
        overrides=dict(
            data=dict(
                layout="nli",
                root=root(),
                # benchmarks/packing.py --mix nli --chunk 576 --length 256 --row_length 256 --multiple 8
                pipeline=_pipeline(
                    72 * per_host,
                    length=256,
                    query_patches=4,
                    patches=4,
                    packing=(_packing((112, 120), (32, 32), 256), _packing((104, 112), (32, 32), 256)),
                ),
            ),
            lora=dict(rank=64, alpha=128.0),
            temperature=dict(learnable=False),
            optimizer=dict(learning_rate=2e-4),
            epochs=2.0,
            grad_cache_chunk=72 * per_host,  # 72 a device at once: the whole host batch, the plain step
        )
    )
    caption = dict(
        init_from="text",
        overrides=dict(
            data=dict(
                layout="caption",
                root=root(),
                # benchmarks/packing.py --mix cc3m --chunk 480 --length 400 --row_length 1024 --multiple 8
                pipeline=_pipeline(
                    60 * per_host,
                    length=400,
                    query_patches=4,
                    packing=(_packing((32,), (32,)), _packing((160, 168), (539552, 567616))),
                ),
            ),
            temperature=dict(learnable=False),
            symmetric=True,  # caption -> image and image -> caption, summed (symmetric_reduction="sum")
            optimizer=dict(learning_rate=1e-4),
            epochs=1.0,
        ),
    )
    mbeir = dict(init_from="caption", overrides=dict())  # the top level: stage 3
    hardneg = dict(
        init_from="mbeir",
        mine_from="mbeir",  # U-MARVEL: the stage-3 model, exact top 100 of the union training pool, 5 negatives
        overrides=dict(
            mining=dict(rule="umarvel", negatives=5, top_k=100, pool="global"),
            # 17 queries per device, each with its positive and 5 mined negatives: 7 sequences per query
            # (packing: benchmarks/packing.py --chunk 136 --negatives 5 --multiple 8 --row_length 1024)
            data=dict(
                pipeline=_pipeline(
                    17 * per_host,
                    negatives=5,
                    packing=(
                        _packing((40, 48), (122528, 135616)),
                        _packing((200, 208, 224, 248), (465600, 494464, 544320, 618112)),
                    ),
                )
            ),
            grad_cache_chunk=17 * per_host,  # 17 queries (119 sequences) a device at once: the plain step
            optimizer=dict(learning_rate=1.5e-5),
            epochs=1.0,
        ),
    )
    # The reranker (U-MARVEL's, from LamRA): trained from the BASE model (no init_from) on pairs from the stage-3
    # model's LOCAL top 100 minus the positives (mined with no random fill, no false-negative filter); LoRA
    # 128/256, lr 2e-5, 1 epoch. The paper's 2 queries per device x 4 accumulation steps: 64 queries per host
    # per step here (mmret has no gradient accumulation), each a positive and a negative pair.
    reranker = dict(
        mine_from="mbeir",
        overrides=dict(
            task="reranker",
            mining=dict(
                rule="umarvel",
                pool="local",
                negatives=100,
                top_k=100,
                false_negative_filter=False,
                random_fallback=False,
            ),
            data=dict(pipeline=dict(batch_size=2 * 4 * per_host, num_negatives=0)),
            rerank=dict(max_patches=2 * 4 * per_host * 2 * 2 * 1200),
            grad_cache_chunk=None,
            optimizer=dict(learning_rate=2e-5),
            epochs=1.0,
            eval=dict(at_start=False, at_end=False),  # a reranker is evaluated by --mode=rerank
        ),
    )
    # Stage 5, distillation: the stage-4 model retrieves the LOCAL top 50 of 10% of the training queries, the
    # reranker rescores them, fused = cosine + w * P(yes) (w 1.0; 0.5 mscoco_task0, 0.1 mscoco_task3); the loss
    # KL(softmax(fused / 2 / tau) || softmax(cosine / tau)), batchmean, no in-batch term; from the merged stage-4
    # model, 2 queries per device (each with its 50 candidates), lr 1e-5, 1 epoch of the sampled queries.
    distill = dict(
        init_from="hardneg",
        teacher_from="reranker",
        overrides=dict(
            task="distill",
            distill=dict(fraction=0.1, top_k=50, weight=1.0, teacher_scale=0.5, infonce_weight=0.0),
            # budgets: 50 each (packing: benchmarks/packing.py --chunk 16 --negatives 49 --multiple 8 --row_length 1024)
            data=dict(
                pipeline=dict(
                    _pipeline(
                        2 * per_host,
                        negatives=49,
                        packing=(
                            _packing((8,), (19040,)),
                            _packing((192, 208, 240, 280), (392640, 501536, 614912, 815168)),
                        ),
                    ),
                    num_negatives=0,
                )
            ),
            grad_cache_chunk=None,
            optimizer=dict(learning_rate=1e-5),
            epochs=1.0,
        ),
    )
    stages = dict(text=text, caption=caption, mbeir=mbeir, hardneg=hardneg, reranker=reranker, distill=distill)
    return ml_collections.ConfigDict(stages, sort_keys=False)


#: The ``:arg`` presets (None: the paper's).
PRESETS = (None, "mbeir", "demo", "mbeir_demo", "qwen3vl_4b")
#: U-MARVEL's image cap, 300 visual tokens, in pixels: Qwen2-VL's tokens are 28 x 28 pixels, Qwen3-VL's 32 x 32.
MAX_PIXELS = {"qwen2_vl": 300 * 28 * 28, "qwen3_vl": 300 * 32 * 32}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"configs/umarvel.py: unknown preset {arg!r} (known: mbeir, demo, mbeir_demo, qwen3vl_4b)")
    c = ml_collections.ConfigDict()
    c.task = "bi_encoder"  # the reranker stage: "reranker"; the distillation: "distill"
    c.model = dict(
        hf_dir=ml_collections.FieldReference(None, field_type=str),
        checkpoint=ml_collections.FieldReference(None, field_type=str),
        preset=ml_collections.FieldReference(None, field_type=str),
        seed=0,
        dtype="bfloat16",
        param_dtype="float32",
        scan_layers=True,
        # Full remat: the 7B stage-3 step fits a v5p-64 with it (63.75 GiB a chip), not with the dots saved
        # (386.85 GiB): tools/aot_compile.py, benchmarks/RESULTS.md "Ahead-of-time fit check".
        remat="full",
        attention_impl="auto",
    )
    # Bidirectional attention, mean pooling with the instruction (and its markers) left out, L2 norm.
    c.encoder = dict(pooling="mean", attention="bidirectional", fusion="joint", normalize=True)
    c.temperature = dict(init=0.05, learnable=True, min=0.01, max=1.0, carry=True)
    c.lora = dict(rank=128, alpha=256.0, dropout=0.05, lora_only=True)
    # U-MARVEL's loss: every other in-batch candidate is a negative; a symmetric loss is the sum of both ways.
    c.mask_false_negatives = False
    c.symmetric_reduction = "sum"
    c.freeze = (r"(.*\.)?visual\..*",)  # vision tower and merger frozen
    c.data = dict(
        root=ml_collections.FieldReference(None, field_type=str),  # the M-BEIR root
        format="raw",
        split="train",
        query_file="auto",  # the union file: query/union_train/mbeir_union_up_train.jsonl (1.33M lines)
        negatives_file=ml_collections.FieldReference(None, field_type=str),
        processor=dict(
            template="umarvel",
            # None: the model directory's preprocessor_config.json (Qwen2-VL 56 x 56, Qwen3-VL 256 x 256 pixels)
            min_pixels=ml_collections.FieldReference(None, field_type=int),
            max_pixels=MAX_PIXELS["qwen2_vl"],
            max_text_tokens=480,
        ),
        pipeline=dict(**_pipeline(PAPER_BATCH_PER_HOST, packing=MBEIR_PACKING), num_workers=8, on_bad_record="skip"),
    )
    # One epoch: steps = lines of the union file // global batch (1.33M / 3840 = 346 on 8 hosts of 8 devices).
    c.epochs = ml_collections.FieldReference(1.0, field_type=float)
    c.optimizer = dict(learning_rate=4e-4, warmup_ratio=0.03, weight_decay=0.0)
    # GradCache chunks are per host: U-MARVEL's 60 sequences a device at once are the whole host batch (the plain
    # step; the loss is over the global batch either way). A smaller chunk (a multiple of the 8 devices) caches.
    c.grad_cache_chunk = PAPER_BATCH_PER_HOST
    c.mesh = dict(data=-1, fsdp=8, tensor=1)
    c.log_every = 10
    c.checkpoint = dict(every=500, keep=3)
    # Hard-negative mining (--mode=mine; the hardneg stage's mine_from): U-MARVEL's rule, the exact top 100 of the
    # union training pool, the first 5 that are not positives. tasks None: the stage's data.tasks (all 16).
    c.mining = dict(
        rule="umarvel",
        negatives=5,
        top_k=100,
        pool="global",
        tasks=ml_collections.FieldReference(None, field_type=tuple),
    )
    # The reranker (task "reranker"; --mode=rerank reranks rerank.retrieval, w from rerank.select_on's val lists).
    c.rerank = dict(
        prompt="umarvel",
        loss_on="assistant_turn",
        max_text_tokens=256,
        max_length=2048,
        max_patches=8 * 2 * 1200,
        top_k=50,
        batch_size=8,
        weight=ml_collections.FieldReference(None, field_type=float),
        cosine=True,
        retrieval=ml_collections.FieldReference(None, field_type=str),
        select_on=ml_collections.FieldReference(None, field_type=str),
    )
    # The distillation teacher (task "distill"; a stage's teacher_from builds distill.teacher_file).
    c.distill = dict(
        teacher_file=ml_collections.FieldReference(None, field_type=str),
        fraction=0.1,
        top_k=50,
        weight=1.0,
        teacher_scale=0.5,
        infonce_weight=0.0,
    )
    # M-BEIR test evaluation (--mode=eval, or eval.at_end): the 16 tasks, local and global pools.
    c.eval = dict(
        root=c.data.get_ref("root"),  # the M-BEIR root, for every stage (the text and caption stages' data is not)
        split="test",  # val: a validation run (eval/val/<step>/), e.g. the lists rerank.select_on chooses w on
        pools=("local", "global"),
        tasks=ml_collections.FieldReference(None, field_type=tuple),  # None: the 16; or e.g. "('cirr_task7',)"
        # Stage 3's shapes, fixed here so that every stage of a chain evaluates alike (0 would take each stage's).
        batch_size=PAPER_BATCH_PER_HOST,
        max_length=800,
        max_patches=PAPER_BATCH_PER_HOST * 1200,
        # Packed rows of 1,024: a batch holds one kind of input (a task's queries, or a pool); about 24 rows of
        # short texts, 70-90 of passages, 160-176 of images (3 a row), 240-320 of image+text; text-only batches
        # take no patch budget.
        packing=dict(
            rows=(32, 96, 176, 320),
            patches=(64, 64, PAPER_BATCH_PER_HOST * 1200, PAPER_BATCH_PER_HOST * 1200),
            row_length=1024,
        ),
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
    if arg in (None, "demo", "qwen3vl_4b"):
        c.stages = _stages()
    if arg == "qwen3vl_4b":
        c.data.processor.max_pixels = MAX_PIXELS["qwen3_vl"]
    if arg in ("demo", "mbeir_demo"):
        _demo(c, chain=arg == "demo")
    c.lock()
    return c


def _demo(c: ml_collections.ConfigDict, *, chain: bool) -> None:
    """The tiny random model and the synthetic data under /tmp/mmret_demo (see the Makefile's ``demo``)."""
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
        # packed rows of 192 tokens; per GradCache chunk of 32 the demo corpus's queries take 11-12 rows, their
        # candidates 9 (first fit over 40 batches; padded: 64% and 47% of the tokens real, packed 85% and 83%).
        # One bucket a side: the tiny model's steps cost little next to compiling each shape (with two buckets a
        # side and three in evaluation `make demo` took 21m52s against 17m46s padded, at the same examples/s).
        **demo_packing((12,), (10,)),
    )
    c.optimizer.learning_rate = 1e-3
    c.epochs = None  # fixed lengths: 600 steps of 64 are ~11.5 epochs of the demo corpus's 3,328-line union file
    c.optimizer.total_steps = 600
    c.grad_cache_chunk = 32
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 25
    c.checkpoint = dict(every=200, keep=2)
    c.eval.update(
        shard_size=4096,
        num_workers=0,
        at_start=True,
        at_end=True,
        check_exact=0,
        batch_size=64,
        max_length=96,
        max_patches=64 * 64,
        # 64 inputs of one kind a batch: short candidate texts take about 8 rows of 192, image+text queries 24
        packing=dict(rows=(24,), patches=(), row_length=192),
    )
    if not chain:
        return
    # The chain in about a quarter of an hour on 2 CPU cores: short text and caption stages, a shorter M-BEIR
    # stage than the single-stage demo, mining with its model, a short hard-negative stage.
    c.optimizer.total_steps = DEMO_STEPS["mbeir"]
    c.eval.at_start = False
    s = c.stages
    s.text.overrides.data.root = "/tmp/mmret_demo/pairs/nli"
    s.text.overrides.data.pipeline = dict(
        batch_size=64,
        max_query_length=96,
        max_candidate_length=96,
        max_query_patches=64,
        max_candidate_patches=64,
        **demo_packing((11,), (11,)),
    )
    for name in ("text", "caption", "hardneg"):  # every weight trains (as above), a fixed length
        s[name].overrides.lora = dict(rank=0)
        s[name].overrides.epochs = None
        s[name].overrides.optimizer = dict(learning_rate=DEMO_LR[name], total_steps=DEMO_STEPS[name])
    s.text.overrides.grad_cache_chunk = 32
    s.text.overrides.eval = dict(at_start=True)  # the model before the chain, for the table's first row
    s.caption.overrides.data.root = "/tmp/mmret_demo/pairs/caption"
    s.caption.overrides.data.pipeline = dict(
        batch_size=64,
        max_query_length=96,
        max_candidate_length=96,
        max_query_patches=64,
        max_candidate_patches=64 * 64,
        **demo_packing((11,), (9,)),
    )
    s.hardneg.overrides.data.pipeline = dict(
        batch_size=16,
        num_negatives=5,
        max_query_length=96,
        max_candidate_length=96,
        max_query_patches=16 * 64,
        max_candidate_patches=16 * 6 * 64,
        **demo_packing((7,), (28,)),
    )
    s.hardneg.overrides.grad_cache_chunk = 16
    # The reranker on the mbeir model's local top-100 lists, every weight trained (random tiny model), 8 queries
    # (16 pairs) per step; then the distillation of its scores over 10% of the training queries' top 10.
    s.reranker.overrides.lora = dict(rank=0)
    s.reranker.overrides.epochs = None
    s.reranker.overrides.optimizer = dict(learning_rate=DEMO_LR["reranker"], total_steps=DEMO_STEPS["reranker"])
    s.reranker.overrides.data.pipeline = dict(batch_size=8, num_negatives=0)
    # (batch_size: the pairs per scoring batch of the distillation teacher, which scores with the reranker's config)
    s.reranker.overrides.rerank = dict(
        max_length=320,
        max_patches=32 * 2 * 64,
        batch_size=32,
        packing=dict(rows=(12, 20)),  # pairs of about 100-200 tokens: 16 (training) or 32 (scoring) a batch
    )
    s.distill.overrides.lora = dict(rank=0)
    s.distill.overrides.epochs = None
    s.distill.overrides.optimizer = dict(learning_rate=DEMO_LR["distill"], total_steps=DEMO_STEPS["distill"])
    s.distill.overrides.distill = dict(top_k=10)
    s.distill.overrides.data.pipeline = dict(
        batch_size=8,
        num_negatives=0,
        max_query_length=96,
        max_candidate_length=96,
        max_query_patches=8 * 64,
        max_candidate_patches=8 * 10 * 64,
        **demo_packing((4,), (24,)),  # lists of 10: 80 candidates
    )


def demo_packing(query_rows: tuple[int, ...], candidate_rows: tuple[int, ...], row_length: int = 192) -> dict:
    """The demo's packing (mmret.data.packing): rows of ``row_length`` tokens, the row counts a batch (a GradCache
    chunk) may take per side, the whole patch budget in each."""
    return dict(
        query_packing=dict(rows=query_rows, patches=(), row_length=row_length),
        candidate_packing=dict(rows=candidate_rows, patches=(), row_length=row_length),
    )


#: Steps and learning rates of the demo chain's stages (the M-BEIR stage's rate is the top level's, 1e-3).
DEMO_STEPS = {"text": 40, "caption": 40, "mbeir": 300, "hardneg": 60, "reranker": 40, "distill": 20}
DEMO_LR = {"text": 1e-3, "caption": 1e-3, "hardneg": 2e-4, "reranker": 1e-3, "distill": 1e-4}
