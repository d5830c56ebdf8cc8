"""Sequence packing on M-BEIR's length mix: the share of computed tokens that are real, and train-step speed.

    python benchmarks/packing.py                      # fractions at the paper's stage-3 shapes + the CPU step
    python benchmarks/packing.py --negatives 5        # the hard-negative stage's candidate side
    python benchmarks/packing.py --no-step            # the fractions alone (no model)

Part 1 (no model): ``--batches`` synthetic training batches (``--chunk`` queries, each with its positive and
``--negatives`` same-task candidates, as one GradCache chunk of a host batch) are laid out padded (one example a
row of ``--length`` tokens, ``--chunk * 1200`` patch rows a side: the paper config) and packed
(:mod:`mmret.data.packing`: rows of ``--length``; buckets chosen on a separate calibration draw at
``--percentiles`` of the rows and patch rows a batch needs, rounded up to ``--multiple``; one example a row as the
last resort). Reported per side: real / computed LLM tokens, real / budgeted patch rows, how often each bucket
was taken, and first fit's bound (every batch in the fewest rows it needs).

Part 2: the bi-encoder train step with GradCache (``--step_preset``, float32, ``--step_chunk`` queries a chunk,
``--step_chunks`` chunks, the vision tower frozen as U-MARVEL trains unless ``--step_train_vision``), the same
batches padded and packed (each side's buckets chosen as above), examples/s, the two interleaved in one process.

The length model (assumptions, stated so they can be argued with). A task is drawn with probability
proportional to its training queries (approx., UniIR's training-set sizes, thousands, no up-sampling). An input's
length is U-MARVEL's template (its own tokens, measured with the project's processor for each combination of
instruction / text / image) + the instruction (queries; lognormal, median 12 tokens) + the text (lognormal per
task, median and sigma below, cut at 480 as the processor does) + the image tokens (photos: 400-1400 x 300-1000
pixels, aspect as drawn; fashion products: 200-600 x 250-800; resized by smart_resize to at most 300*28*28 pixels,
the U-MARVEL cap, one token per 28x28). Medians: captions 13 (MSCOCO), news captions 28 (VisualNews), product
descriptions 9 (Fashion200K), questions 18 (WebQA), headlines 20 (EDIS), modification texts 14 (CIRR, FashionIQ),
entity questions 10-12 (OVEN, InfoSeek), Wikipedia passages 95 (WebQA) and entity summaries 110 (OVEN, InfoSeek).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmret.data import packing  # noqa: E402
from mmret.data.packing import PackingConfig  # noqa: E402
from mmret.data.smart_resize import UMARVEL_MAX_PIXELS, smart_resize  # noqa: E402

PHOTO, FASHION = "photo", "fashion"
IMAGE_SIZES = {PHOTO: ((400, 1400), (300, 1000)), FASHION: ((200, 600), (250, 800))}  # (width, height) ranges


@dataclasses.dataclass(frozen=True)
class Side:
    text: tuple[float, float] | None = None  # lognormal (median tokens, sigma)
    image: str | None = None


#: task -> (training queries, thousands, approx.), query, candidate
TASKS: dict[str, tuple[int, Side, Side]] = {
    "visualnews_task0": (99, Side(text=(28, 0.45)), Side(image=PHOTO)),
    "mscoco_task0": (100, Side(text=(13, 0.2)), Side(image=PHOTO)),
    "fashion200k_task0": (15, Side(text=(9, 0.3)), Side(image=FASHION)),
    "webqa_task1": (17, Side(text=(18, 0.35)), Side(text=(95, 0.55))),
    "edis_task2": (26, Side(text=(20, 0.35)), Side(text=(20, 0.35), image=PHOTO)),
    "webqa_task2": (17, Side(text=(18, 0.35)), Side(text=(16, 0.4), image=PHOTO)),
    "visualnews_task3": (100, Side(image=PHOTO), Side(text=(28, 0.45))),
    "mscoco_task3": (113, Side(image=PHOTO), Side(text=(13, 0.2))),
    "fashion200k_task3": (15, Side(image=FASHION), Side(text=(9, 0.3))),
    "nights_task4": (16, Side(image=PHOTO), Side(image=PHOTO)),
    "oven_task6": (150, Side(text=(10, 0.3), image=PHOTO), Side(text=(110, 0.6))),
    "infoseek_task6": (141, Side(text=(12, 0.3), image=PHOTO), Side(text=(110, 0.6))),
    "fashioniq_task7": (16, Side(text=(14, 0.3), image=FASHION), Side(image=FASHION)),
    "cirr_task7": (26, Side(text=(14, 0.35), image=PHOTO), Side(image=PHOTO)),
    "oven_task8": (157, Side(text=(10, 0.3), image=PHOTO), Side(text=(110, 0.6), image=PHOTO)),
    "infoseek_task8": (143, Side(text=(12, 0.3), image=PHOTO), Side(text=(110, 0.6), image=PHOTO)),
}
#: The first two stages' data (``--mix``): SimCSE's NLI sentence pairs (text only) and CC3M captions -> images;
#: no instruction in either (U-MARVEL's stages 1 and 2).
MIXES: dict[str, dict[str, tuple[int, Side, Side]]] = {
    "mbeir": TASKS,
    "nli": {"nli": (1, Side(text=(14, 0.4)), Side(text=(12, 0.4)))},
    "cc3m": {"cc3m": (1, Side(text=(13, 0.35)), Side(image=PHOTO))},
}
INSTRUCTION = (12, 0.25)
MAX_TEXT = 480


@dataclasses.dataclass(frozen=True)
class Input:
    """One sampled input: token counts and the image's patch grid (rows, cols of 14-pixel patches)."""

    template: int
    instruction: int
    text: int
    grid: tuple[int, int] | None

    @property
    def image_tokens(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1] // 4

    @property
    def length(self) -> int:
        return self.template + self.instruction + self.text + self.image_tokens

    @property
    def patches(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]


def template_tokens() -> dict[tuple[bool, bool, bool], int]:
    """U-MARVEL's template's own tokens (markers, chat scaffolding, vision start/end) per (instruction, text,
    image), measured with the project's processor."""
    from PIL import Image

    from mmret.data.processor import Processor, ProcessorConfig
    from mmret.models.qwen2_vl.processor_files import write_processor_files

    with tempfile.TemporaryDirectory() as d:
        write_processor_files(Path(d))
        proc = Processor(d, ProcessorConfig(template="umarvel", max_pixels=UMARVEL_MAX_PIXELS))
    image = Image.new("RGB", (56, 56))
    out = {}
    for instr in (False, True):
        for text in (False, True):
            for img in (False, True):
                if not (text or img):
                    continue
                ex = proc(
                    text="a cat" if text else None,
                    image=image if img else None,
                    instruction="Find it." if instr else None,
                )
                out[(instr, text, img)] = (
                    ex.length - ex.num_text_tokens - ex.num_instruction_tokens - ex.num_image_tokens
                )
    return out


class LengthModel:
    """Draws (query, candidates) inputs of M-BEIR's training mix (the module docstring's assumptions)."""

    def __init__(self, template: dict[tuple[bool, bool, bool], int], seed: int, max_length: int, mix: str = "mbeir"):
        self.template = template
        self.max_length = max_length
        self.rng = np.random.default_rng(seed)
        self.mix = MIXES[mix]
        self.instructions = mix == "mbeir"
        self.tasks = list(self.mix)
        weights = np.array([self.mix[t][0] for t in self.tasks], np.float64)
        self.p = weights / weights.sum()

    def _tokens(self, median_sigma: tuple[float, float]) -> int:
        median, sigma = median_sigma
        return int(np.clip(round(median * np.exp(sigma * self.rng.standard_normal())), 1, MAX_TEXT))

    def _grid(self, kind: str) -> tuple[int, int]:
        (w0, w1), (h0, h1) = IMAGE_SIZES[kind]
        h, w = smart_resize(
            int(self.rng.integers(h0, h1)), int(self.rng.integers(w0, w1)), max_pixels=UMARVEL_MAX_PIXELS
        )
        return h // 14, w // 14

    def side(self, side: Side, query: bool) -> Input:
        text = self._tokens(side.text) if side.text else 0
        grid = self._grid(side.image) if side.image else None
        query = query and self.instructions
        instruction = self._tokens(INSTRUCTION) if query else 0
        key = (query, side.text is not None, side.image is not None)
        x = Input(self.template[key], instruction, text, grid)
        # the processor's max_length: the text is shortened first
        return dataclasses.replace(x, text=max(0, text - max(0, x.length - self.max_length)))

    def example(self, negatives: int) -> tuple[Input, list[Input]]:
        task = self.tasks[int(self.rng.choice(len(self.tasks), p=self.p))]
        _, q, c = self.mix[task]
        return self.side(q, True), [self.side(c, False) for _ in range(1 + negatives)]


def needed(inputs: list[Input], length: int, segments: int) -> tuple[int, int]:
    """The fewest rows first fit packs ``inputs`` in, and their patch rows."""
    lengths = [x.length for x in inputs]
    if max(lengths) > length:
        raise ValueError(f"an input of {max(lengths)} tokens does not fit a row of {length}")
    rows = max(1, -(-sum(lengths) // length))
    while packing.first_fit(lengths, rows, length, segments) is None:
        rows += 1
    return rows, sum(x.patches for x in inputs)


def _up(x: float, m: int) -> int:
    return max(m, -(-int(np.ceil(x)) // m) * m)


def choose_buckets(
    draws: list[list[Input]],
    row_length: int,
    segments: int,
    multiple: int,
    percentiles: tuple[float, ...],
    margin: float = 1.0,
) -> PackingConfig:
    """Buckets at ``percentiles`` of the rows and patch rows the calibration batches need, the last times
    ``margin`` (a bucket of all the rows is dropped: one example a row is the last resort anyway)."""
    rows, patches = zip(*(needed(d, row_length, segments) for d in draws), strict=True)
    n = len(draws[0])
    out_rows: list[int] = []
    out_patches: list[int] = []
    for i, q in enumerate(percentiles):
        m = margin if i == len(percentiles) - 1 else 1.0
        r, pt = _up(m * np.percentile(rows, q), multiple), _up(m * np.percentile(patches, q), 4 * multiple)
        if r >= n:
            continue
        if out_rows and r == out_rows[-1]:
            out_patches[-1] = max(out_patches[-1], pt)
        else:
            out_rows.append(r)
            out_patches.append(pt)
    return PackingConfig(rows=tuple(out_rows), patches=tuple(out_patches), max_segments=segments, row_length=row_length)


def fractions(draws: list[list[Input]], cfg: PackingConfig, length: int, patch_budget: int) -> dict:
    """Real / computed tokens and patch rows, padded and packed, and how often each bucket was taken."""
    real = sum(x.length for d in draws for x in d)
    real_patches = sum(x.patches for d in draws for x in d)
    n = len(draws[0])
    row = cfg.row_length or length
    ideal = sum(needed(d, row, cfg.max_segments)[0] for d in draws) * row
    computed = computed_patches = 0
    taken: dict[str, int] = {}
    for d in draws:
        bins, budget = packing.plan([x.length for x in d], cfg, row, sum(x.patches for x in d), patch_budget)
        computed += len(bins) * row
        computed_patches += budget
        key = "padded" if len(bins) == n and budget == patch_budget else f"{len(bins)}x{budget}"
        taken[key] = taken.get(key, 0) + 1
    return {
        "padded_real_tokens": real / (len(draws) * n * length),
        "packed_real_tokens": real / computed,
        "first_fit_bound": real / ideal,  # every batch in the fewest rows first fit needs
        "padded_real_patches": real_patches / (len(draws) * patch_budget),
        "packed_real_patches": real_patches / computed_patches,
        "mean_length": real / (len(draws) * n),
        "buckets": {"rows": list(cfg.rows), "patches": list(cfg.patches), "row_length": row},
        "taken": taken,
    }


# ================================================================================================= the step


def processed(x: Input, rng: np.random.Generator, image_token: int, specials: dict[str, int]):
    """A :class:`ProcessedExample` of ``x``'s shape: random word ids, the image's pads between vision markers."""
    from mmret.data.processor import ProcessedExample
    from mmret.models.qwen2_vl.position_ids import mrope_position_ids

    n_img = x.image_tokens
    ids = rng.integers(100, 150000, x.length).astype(np.int32)
    pool = np.ones(x.length, np.int32)
    if x.grid:
        ids[1] = specials["vision_start"]
        ids[2 : 2 + n_img] = image_token
        ids[2 + n_img] = specials["vision_end"]
    pool[x.length - x.instruction - 2 : x.length - 2] = 0  # the instruction is not pooled
    grid = None if x.grid is None else np.array([[1, *x.grid]], np.int32)
    pos = mrope_position_ids(ids[None], np.ones((1, x.length)), grid, image_token_id=image_token, xp=np)[:, 0]
    pixels = None if x.grid is None else rng.standard_normal((x.patches, 1176)).astype(np.float32)
    return ProcessedExample(
        input_ids=ids,
        attention_mask=np.ones(x.length, np.int32),
        pool_mask=pool,
        position_ids=pos.astype(np.int32),
        pixel_values=pixels,
        image_grid_thw=grid,
        num_text_tokens=x.text,
        num_instruction_tokens=x.instruction,
        num_image_tokens=n_img,
        truncated=False,
    )


def step_benchmark(args, template) -> dict:
    import jax
    import optax

    from mmret import models, sharding
    from mmret.data.bad_records import BadRecords
    from mmret.data.pipeline import PipelineConfig, TrainExample, collate_train
    from mmret.data.processor import Processor, ProcessorConfig
    from mmret.lora import trainable_filter
    from mmret.losses import Temperature
    from mmret.models.encoder import Encoder, EncoderConfig
    from mmret.models.qwen2_vl.processor_files import write_processor_files
    from mmret.models.retriever import Retriever
    from mmret.tasks.base import init_state, split_model
    from mmret.tasks.bi_encoder.step import StepConfig, make_train_step
    from mmret.tasks.bi_encoder.task import BiEncoder

    spec = models.find_preset(args.step_preset)
    tokens = spec.tokens
    with tempfile.TemporaryDirectory() as d:
        write_processor_files(Path(d))
        proc = Processor(d, ProcessorConfig(template="umarvel", max_pixels=UMARVEL_MAX_PIXELS))
    chunk, n_chunks, neg, length = args.step_chunk, args.step_chunks, args.negatives, args.length
    batch = chunk * n_chunks
    model_lengths = LengthModel(template, seed=args.seed + 7, max_length=length, mix=args.mix)
    calib = [[model_lengths.example(neg) for _ in range(chunk)] for _ in range(args.calibration)]
    row = args.row_length or length
    pick_q, pick_c = (lambda d: [q for q, _ in d]), (lambda d: [c for _, cs in d for c in cs])
    q_cfg = choose_buckets([pick_q(d) for d in calib], row, args.segments, 1, args.percentiles, args.margin)
    c_cfg = choose_buckets([pick_c(d) for d in calib], row, args.segments, 1, args.percentiles, args.margin)
    base = PipelineConfig(
        batch_size=batch,
        num_negatives=neg,
        max_query_length=length,
        max_candidate_length=length,
        max_query_patches=batch * 1200,
        max_candidate_patches=batch * (1 + neg) * 1200,
        grad_cache_chunk=chunk,
    )
    cfgs = {"padded": base, "packed": dataclasses.replace(base, query_packing=q_cfg, candidate_packing=c_cfg)}
    rng = np.random.default_rng(args.seed + 11)
    img, sp = tokens.image_pad.id, {"vision_start": tokens.vision_start.id, "vision_end": tokens.vision_end.id}

    def train_examples():
        out = []
        for i in range(batch):
            q, cs = model_lengths.example(neg)
            out.append(
                TrainExample(
                    query=processed(q, rng, img, sp),
                    candidates=[processed(c, rng, img, sp) for c in cs],
                    qid=f"q{i}",
                    dids=[f"d{i}_{j}" for j in range(len(cs))],
                    positives=frozenset({f"d{i}_0"}),
                    bad=BadRecords("skip"),
                )
            )
        return out

    draws = [train_examples() for _ in range(args.step_batches)]
    mesh, rules = sharding.make_mesh({"data": -1}), sharding.make_rules()
    task = BiEncoder()
    backbone = models.from_preset(args.step_preset, seed=0, max_image_patches=1200)
    model = Retriever(Encoder(backbone, EncoderConfig()), Temperature(0.05, learnable=False))
    tx = optax.adamw(1e-5)
    # U-MARVEL's stages train the LLM with the vision tower and merger frozen (configs/umarvel.py ``freeze``):
    # no vision backward then. ``--step_train_vision`` trains every parameter.
    frozen = () if args.step_train_vision else (r"encoder\.backbone\.visual\..*",)
    graphdef, params, rest = split_model(model, trainable_filter(frozen))
    inner = make_train_step(graphdef, tx, StepConfig(grad_cache=True))

    def step(state, b):
        mask = b["positive_mask"]
        return inner(state, {**b, "positive_mask": mask.reshape(mask.shape[0] * mask.shape[1], -1)})

    jitted = jax.jit(step)
    state0 = init_state(params, rest, tx)
    batches = {k: [] for k in cfgs}
    real = {k: [0, 0] for k in cfgs}
    for d in draws:
        for k, cfg in cfgs.items():
            host = collate_train(d, proc, cfg)
            for side in ("query", "candidates"):
                real[k][0] += int(np.sum(host[side]["attention_mask"]))
                real[k][1] += int(np.size(host[side]["attention_mask"]))
            with jax.set_mesh(mesh), sharding.axis_rules(rules):
                batches[k].append(task.global_arrays(host, mesh, rules))
    times = {k: [] for k in cfgs}
    compile_s = {}
    for k in cfgs:  # compile every shape once (not timed as steps)
        t0 = time.perf_counter()
        for b in batches[k]:
            jax.block_until_ready(jitted(state0, b)[1]["loss"])
        compile_s[k] = time.perf_counter() - t0
        print(f"{k}: first pass over the batches {compile_s[k]:.1f}s", file=sys.stderr, flush=True)
    for _ in range(args.iters):
        for i in range(len(draws)):
            for k in cfgs:
                t0 = time.perf_counter()
                jax.block_until_ready(jitted(state0, batches[k][i])[1]["loss"])
                times[k].append(time.perf_counter() - t0)
    examples = batch * (2 + neg)  # queries + candidates embedded per step
    out = {
        k: {"median_step_s": statistics.median(t), "examples_per_s": examples / statistics.median(t)}
        for k, t in times.items()
    }
    for k in cfgs:
        out[k]["real_tokens"] = real[k][0] / real[k][1]
        out[k]["first_pass_s"] = compile_s[k]
    out["speedup"] = out["packed"]["examples_per_s"] / out["padded"]["examples_per_s"]
    out["shapes"] = {
        "chunk": chunk,
        "chunks": n_chunks,
        "length": length,
        "negatives": neg,
        "preset": args.step_preset,
        "vision": "trained" if args.step_train_vision else "frozen",
    }
    out["buckets"] = {"query": dataclasses.asdict(q_cfg), "candidates": dataclasses.asdict(c_cfg)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=60, help="queries per GradCache chunk (U-MARVEL's 60 per device)")
    p.add_argument("--negatives", type=int, default=0)
    p.add_argument("--mix", default="mbeir", choices=sorted(MIXES), help="M-BEIR's training mix, or stage 1's / 2's")
    p.add_argument("--length", type=int, default=800, help="tokens per row (the paper config's max length)")
    p.add_argument("--segments", type=int, default=16)
    p.add_argument("--row_length", type=int, default=0, help="tokens per packed row (0: --length)")
    p.add_argument("--multiple", type=int, default=1, help="row counts rounded up to a multiple (batch shards)")
    p.add_argument(
        "--percentiles",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        default=(30.0, 60.0, 90.0, 100.0),
        help="the buckets: these percentiles of the calibration batches' needs",
    )
    p.add_argument("--margin", type=float, default=1.05, help="the last bucket: its percentile times this")
    p.add_argument("--batches", type=int, default=500)
    p.add_argument("--calibration", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-step", dest="step", action="store_false")
    p.add_argument("--step_preset", default="small")
    p.add_argument("--step_chunk", type=int, default=4)
    p.add_argument("--step_chunks", type=int, default=2, help="GradCache chunks a step")
    p.add_argument("--step_train_vision", action="store_true", help="train the vision tower too (default: frozen)")
    p.add_argument("--step_batches", type=int, default=2)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = p.parse_args()

    template = template_tokens()
    model = LengthModel(template, seed=args.seed, max_length=args.length, mix=args.mix)
    row = args.row_length or args.length
    calib = [[model.example(args.negatives) for _ in range(args.chunk)] for _ in range(args.calibration)]
    draws = [[model.example(args.negatives) for _ in range(args.chunk)] for _ in range(args.batches)]
    res: dict = {"template_tokens": {str(k): v for k, v in template.items()}}
    for side, pick in (
        ("query", lambda d: [q for q, _ in d]),
        ("candidates", lambda d: [c for _, cs in d for c in cs]),
    ):
        cfg = choose_buckets([pick(d) for d in calib], row, args.segments, args.multiple, args.percentiles, args.margin)
        n = len(pick(draws[0]))
        res[side] = fractions([pick(d) for d in draws], cfg, args.length, n * 1200)
    sides = [(res[s], n) for s, n in (("query", args.chunk), ("candidates", args.chunk * (1 + args.negatives)))]
    real = sum(r["mean_length"] * n for r, n in sides)
    res["overall_padded_real_tokens"] = real / (sum(n for _, n in sides) * args.length)
    res["overall_packed_real_tokens"] = real / sum(r["mean_length"] * n / r["packed_real_tokens"] for r, n in sides)
    if args.step:
        res["step"] = step_benchmark(args, template)
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
