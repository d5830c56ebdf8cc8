"""A trained retriever in a user's hands: load an exported directory or a run, embed ad-hoc inputs.

    import mmret

    retriever = mmret.Retriever.from_pretrained("export/")   # or a run directory (its latest checkpoint)
    q = retriever.encode_queries(["a dog on a beach"], task="mscoco_task0")
    c = retriever.encode_candidates([{"image": "dog.jpg"}, "A cat sleeps.", {"image": img, "text": "A cat."}])
    scores = q @ c.T                                         # cosine similarities [queries, candidates]

An input is a string (text), a ``PIL.Image.Image`` or ``pathlib.Path`` (an image), or a mapping with ``text``
and/or ``image`` (a path string, a ``Path`` or a PIL image) and, for a query, ``instruction`` or ``task``. A
query's instruction is the call's ``instruction``, else the first instruction of the call's ``task`` (an M-BEIR
dataset-task name such as ``mscoco_task0``, from the instruction table the export carries, or the run's data);
none is allowed too. Text goes through UniIR's formatting and the template as in the run's evaluation
(``mmret_embedding.json``). Inputs are embedded in batches of ``batch_size`` (a multiple of the device count),
each padded to a power-of-two length and patch budget, so a few programs serve any input mix. Outputs are
float32 numpy arrays [N, hidden], L2-normalised, in input order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from mmret import models
from mmret.atomic_dir import PathLike
from mmret.build import processor_dir
from mmret.checkpoints import CONFIG, load_trained, resolve_step, run_config
from mmret.data.images import DEFAULT_MAX_PIXELS, load_image_bytes
from mmret.data.mbeir import format_query, format_text
from mmret.data.pipeline import collate_side
from mmret.data.processor import ProcessedExample, Processor
from mmret.eval.embed import Embedder
from mmret.export.files import EMBEDDING_FILE, read_embedding_json, run_instructions
from mmret.losses import l2_normalize
from mmret.models.encoder import Encoder
from mmret.recipe import TrainerConfig

Input = str | Path | Image.Image | Mapping[str, Any]

#: The smallest length and patch budget a batch is padded to (then powers of two).
MIN_LENGTH, MIN_PATCHES = 64, 64


def _bucket(n: int, smallest: int) -> int:
    """The least power of two >= max(n, smallest)."""
    return 1 << max(int(n) - 1, smallest - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Part:
    text: str | None
    image: Image.Image | None
    instruction: str | None = None


class Retriever:
    """An embedding model with its processor: :meth:`encode_queries`, :meth:`encode_candidates`."""

    def __init__(
        self,
        encoder: Encoder,
        processor: Processor,
        *,
        temperature: float,
        instructions: Mapping[str, Sequence[str]],
        for_eval: bool = True,
        batch_size: int = 8,
        max_decode_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        devices = jax.device_count()
        self.batch_size = -(-max(batch_size, 1) // devices) * devices  # a multiple of the devices
        self.processor, self.temperature, self.for_eval = processor, float(temperature), for_eval
        self.instructions = {k: tuple(v) for k, v in instructions.items()}
        self.max_decode_pixels = max_decode_pixels
        self.normalize = encoder.cfg.normalize
        self._embed = Embedder(encoder, TrainerConfig())
        self.dim = self._embed.dim

    @classmethod
    def from_pretrained(
        cls, path: PathLike, *, step: int | None = None, dtype: str = "float32", batch_size: int = 8
    ) -> Retriever:
        """An exported directory (``mmret_embedding.json`` beside the transformers files), or a training run's
        directory (its ``config.json``; checkpoint ``step``, default the latest; 0: the model it starts from)."""
        path = Path(path)
        if (path / EMBEDDING_FILE).is_file():
            spec = read_embedding_json(path)
            backbone = models.from_hf(path, dtype=dtype, param_dtype=dtype)
            processor = Processor(path, spec.processor)
            return cls(
                Encoder(backbone, spec.encoder),
                processor,
                temperature=spec.temperature,
                instructions=spec.instructions,
                for_eval=spec.for_eval,
                batch_size=batch_size,
            )
        if (path / CONFIG).is_file():
            cfg = run_config(path)
            if cfg.task == "reranker":
                raise ValueError(f"{path}: a reranker run (task 'reranker'), not a retriever")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype, param_dtype=dtype))
            step = resolve_step(path, step)
            model = load_trained(cfg, path if step else None, step)
            return cls(
                model.encoder,
                Processor(processor_dir(cfg), cfg.data.processor),
                temperature=float(model.temperature()),
                instructions=run_instructions(cfg),
                batch_size=batch_size,
            )
        raise FileNotFoundError(f"{path}: neither an exported retriever ({EMBEDDING_FILE}) nor a run ({CONFIG})")

    # ---------------------------------------------------------------------------------------- inputs

    def _image(self, value: Any, where: str) -> Image.Image:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, str | Path):
            p = Path(value)
            if not p.is_file():
                raise FileNotFoundError(f"{where}: image {p}: no such file")
            return load_image_bytes(p.read_bytes(), max_pixels=self.max_decode_pixels, name=str(p))
        raise TypeError(f"{where}: image must be a path or a PIL image, got {type(value).__name__}")

    @staticmethod
    def _mapping(item: Input, where: str) -> dict[str, Any]:
        if isinstance(item, str):
            return {"text": item}
        if isinstance(item, Image.Image | Path):
            return {"image": item}
        if not isinstance(item, Mapping):
            raise TypeError(f"{where}: expected text, an image or a mapping, got {type(item).__name__}")
        return dict(item)

    def _part(self, item: dict[str, Any], where: str, *, query: bool) -> _Part:
        allowed = {"text", "image", "instruction", "task"} if query else {"text", "image"}
        unknown = set(item) - allowed
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
        image = None if item.get("image") is None else self._image(item["image"], where)
        text = item.get("text") or None
        if text is None and image is None:
            raise ValueError(f"{where}: an input needs text or an image")
        if not query:
            return _Part(format_text(text) or None, image)
        instruction = item.get("instruction") or self.instruction(item.get("task"), where)
        instruction, text = format_query(instruction, text)
        return _Part(text or None, image, instruction or None)

    def instruction(self, task: str | None, where: str = "task") -> str | None:
        """The first instruction of M-BEIR dataset-task ``task`` (None: no instruction)."""
        if task is None:
            return None
        if task not in self.instructions:
            have = ", ".join(sorted(self.instructions)) or "none: give instruction= instead"
            raise ValueError(f"{where}: no instructions for task {task!r} (have: {have})")
        return self.instructions[task][0]

    # -------------------------------------------------------------------------------------- encoding

    def _batches(self, examples: list[ProcessedExample]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        b = self.batch_size
        for start in range(0, len(examples), b):
            chunk = examples[start : start + b]
            full = chunk + [chunk[-1]] * (b - len(chunk))
            length = _bucket(max(e.length for e in full), MIN_LENGTH)
            patches = _bucket(sum(e.num_patches for e in full) + 2, MIN_PATCHES)  # + room for the filler row
            yield len(chunk), collate_side(full, self.processor, None, max_length=length, max_patches=patches)

    def _encode(self, items: Sequence[Input], *, query: bool, **defaults: Any) -> np.ndarray:
        if isinstance(items, str | Path | Image.Image | Mapping):
            raise TypeError("give a list of inputs (one input: [x])")
        examples = []
        given = {k: v for k, v in defaults.items() if v is not None}
        for i, item in enumerate(items):
            where = f"{'queries' if query else 'candidates'}[{i}]"
            d = self._mapping(item, where)
            if query and not {"instruction", "task"} & d.keys():
                d.update(given)
            part = self._part(d, where, query=query)
            examples.append(self.processor(part.text, part.image, instruction=part.instruction, for_eval=self.for_eval))
        out = np.zeros((len(examples), self.dim), np.float32)
        done = 0
        for n, batch in self._batches(examples):
            emb = self._embed(batch)
            if not self.normalize:
                emb = l2_normalize(emb)
            out[done : done + n] = np.asarray(emb, np.float32)[:n]
            done += n
        return out

    def encode_queries(
        self, queries: Sequence[Input], *, instruction: str | None = None, task: str | None = None
    ) -> np.ndarray:
        """Embeddings [N, D] of ``queries``; ``instruction`` (or ``task``'s first instruction) for those that
        do not name their own."""
        if instruction is not None and task is not None:
            raise ValueError("give instruction or task, not both")
        return self._encode(queries, query=True, instruction=instruction, task=task)

    def encode_candidates(self, candidates: Sequence[Input]) -> np.ndarray:
        """Embeddings [N, D] of ``candidates`` (no instruction)."""
        return self._encode(candidates, query=False)
