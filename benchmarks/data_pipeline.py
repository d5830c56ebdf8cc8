"""Training examples per second per CPU core: image+text queries with 300-token images, tokenisation
included, from a raw M-BEIR root and (when built) from its ArrayRecord/TFDS build.

    python benchmarks/data_pipeline.py [--examples 256] [--workers 0]

It writes the tiny synthetic corpus, re-renders every image at --image_size (640x480 gives the
U-MARVEL cap of 300 image tokens) and times the training pipeline on the (image, text) -> image
tasks (CIRR, FashionIQ): each example is an image+text query and an image candidate. "Per core" is
examples divided by the CPU seconds the process (and its grain workers) used, so it does not depend
on how many cores the machine lent; wall-clock examples/s is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmret.data.pipeline import PipelineConfig, train_dataset  # noqa: E402
from mmret.data.processor import Processor, ProcessorConfig  # noqa: E402
from mmret.data.smart_resize import UMARVEL_MAX_PIXELS  # noqa: E402
from mmret.data.stores import ArrayRecordStore, RawStore  # noqa: E402
from mmret.data.synthetic import write_synthetic_mbeir  # noqa: E402
from mmret.data.tfds_mbeir import build_tfds_mbeir  # noqa: E402
from mmret.models.qwen2_vl.processor_files import write_processor_files  # noqa: E402

TASKS = ["cirr_task7", "fashioniq_task7"]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (grain workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def upscale_images(root: Path, size: tuple[int, int]) -> int:
    """Re-render every corpus image at ``size`` (keeps content, adds detail so PNG decode is realistic)."""
    rng = np.random.default_rng(0)
    n = 0
    for path in (root / "mbeir_images").rglob("*.png"):
        img = Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, size=(size[1], size[0], 3))
        pixels = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        n += 1
    return n


def measure(store, processor: Processor, cfg: PipelineConfig, examples: int) -> dict[str, float]:
    it = iter(train_dataset(store, processor, cfg, process_index=0, process_count=1))
    next(it)  # warm-up: worker start, first batch
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    n = 0
    while n < examples:
        batch = next(it)
        n += batch["query"]["input_ids"].shape[0]
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    tokens = int((batch["query"]["input_ids"] == processor.image_token_id).sum(-1).max())
    del it
    return {
        "examples": n,
        "examples_per_cpu_second": round(n / cpu, 1),
        "examples_per_wall_second": round(n / wall, 1),
        "image_tokens_per_query": tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="grain worker processes (0: main process)")
    p.add_argument("--read_threads", type=int, default=1, help="mapping threads per process")
    p.add_argument("--image_size", default="640x480", help="WxH the corpus images are re-rendered at")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    size = tuple(int(x) for x in args.image_size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "mbeir"
        write_synthetic_mbeir(root, scale="tiny", seed=0)
        n_images = upscale_images(root, size)
        write_processor_files(tmp / "model")
        processor = Processor(tmp / "model", ProcessorConfig(max_pixels=UMARVEL_MAX_PIXELS))
        cfg = PipelineConfig(
            batch_size=args.batch_size,
            max_query_length=512,
            max_candidate_length=512,
            max_query_patches=args.batch_size * 1200,
            max_candidate_patches=args.batch_size * 1200,
            num_workers=args.workers,
            read_threads=args.read_threads,
        )
        results = {
            "image_size": args.image_size,
            "images": n_images,
            "workers": args.workers,
            "read_threads": args.read_threads,
        }
        results["raw"] = measure(RawStore(root, "train", tasks=TASKS), processor, cfg, args.examples)
        build_tfds_mbeir(root, tmp / "tfds", splits=["train"], tasks=TASKS)
        store = ArrayRecordStore(tmp / "tfds", "train", tasks=TASKS)
        results["tfds"] = measure(store, processor, cfg, args.examples)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
