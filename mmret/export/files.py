"""What an exported directory says about its model beyond the transformers files: ``mmret_embedding.json``
(a retriever) or ``mmret_reranker.json`` (a reranker).

``mmret_embedding.json`` holds everything that turns the backbone's hidden states into the trained
embedding, as plain values a user's own code can follow:

- ``template``: the prompt layout's strings (:class:`mmret.data.templates.TemplateSpec`: its name, the system
  turn, the instruction markers, the summary suffix with its ``{modality}`` words, the embedding token) and
  ``examples``, the rendered prompt of a query and of each kind of candidate (``<|image_pad|>`` stands for the
  image's tokens, one per merged patch);
- ``for_eval``: whether inputs take the template's evaluation form (as the run's evaluation did);
- ``pooling`` / ``pool_scope``: ``mean`` over the tokens the pool mask keeps (``sequence``: every token but
  the instruction and its two markers; ``content``: the image and free-text tokens only), or ``last``
  (the last token); ``attention``: ``bidirectional`` (no causal mask) or ``causal``; ``fusion``: ``joint`` (one
  pass over image and text) or ``late`` (see :mod:`mmret.models.encoder`); ``normalize``: L2-normalised;
- ``processor``: ``min_pixels`` / ``max_pixels`` (also written into ``preprocessor_config.json``),
  ``max_text_tokens``, ``max_length``;
- ``text_format``: ``uniir`` (query and candidate text go through UniIR's ``format_string``: stripped,
  first letter capitalised, a final period; the query is ``instruction + " " + text`` formatted as one string);
- ``temperature``: the trained InfoNCE temperature (similarity / temperature are the training logits);
- ``instructions``: M-BEIR task name -> its query instructions, from the run's data (when it had them).

``mmret_reranker.json``: the yes/no prompt (:class:`mmret.data.rerank_prompts.RerankPrompt`) and how the
score is read (P(yes): the softmax over the two answer tokens' logits at the first answer position).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmret.data.mbeir import EVAL_TASKS, Instructions, instructions_path, read_instructions
from mmret.data.processor import Processor, ProcessorConfig
from mmret.data.rerank_prompts import RerankPrompt
from mmret.models.encoder import EncoderConfig
from mmret.recipe import TrainerConfig, parse

EMBEDDING_FILE = "mmret_embedding.json"
RERANKER_FILE = "mmret_reranker.json"
EMBEDDING_FORMAT, RERANKER_FORMAT, VERSION = "mmret.embedding", "mmret.reranker", 1


@dataclasses.dataclass(frozen=True)
class EmbeddingSpec:
    """An exported retriever's embedding recipe, read back from ``mmret_embedding.json``."""

    processor: ProcessorConfig
    encoder: EncoderConfig
    temperature: float
    for_eval: bool
    instructions: Mapping[str, tuple[str, ...]]


def _examples(processor: Processor, for_eval: bool) -> dict[str, str]:
    """The rendered prompt of a query with an image and of each kind of candidate."""
    render = processor.render
    return {
        "query (instruction, image, text)": render(
            "Text.", instruction="Instruction.", has_image=True, for_eval=for_eval
        ),
        "query (instruction, text)": render("Text.", instruction="Instruction.", for_eval=for_eval),
        "candidate (image, text)": render("Text.", has_image=True, for_eval=for_eval),
        "candidate (image)": render(None, has_image=True, for_eval=for_eval),
        "candidate (text)": render("Text.", for_eval=for_eval),
    }


def instruction_table(instructions: Instructions) -> dict[str, list[str]]:
    """M-BEIR task name (e.g. ``visualnews_task0``) -> its query instructions, for the evaluated tasks the
    table covers."""
    out = {}
    for task in EVAL_TASKS:
        key = (task.dataset_id, task.query_modality, task.cand_modality)
        if key in instructions.table:
            out[task.name] = list(instructions.table[key])
    return out


def run_instructions(cfg: TrainerConfig) -> dict[str, list[str]]:
    """The instruction table of a run's M-BEIR root (``eval.root``, else ``data.root``); empty without one."""
    root = cfg.eval.root or cfg.data.root
    path = instructions_path(root) if root else None
    return instruction_table(read_instructions(path)) if path is not None and path.is_file() else {}


def embedding_json(
    processor: Processor,
    encoder: EncoderConfig,
    temperature: float,
    *,
    model_type: str,
    instructions: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The ``mmret_embedding.json`` of a retriever (``processor``: the run's, with its effective pixel bounds;
    ``instructions``: task -> query instructions, :func:`run_instructions`)."""
    pcfg = processor.config
    table = {k: list(v) for k, v in (instructions or {}).items()}
    return {
        "format": EMBEDDING_FORMAT,
        "version": VERSION,
        "model_type": model_type,
        "template": dataclasses.asdict(processor.template),
        "examples": _examples(processor, True),
        "for_eval": True,
        "pooling": encoder.pooling,
        "pool_scope": pcfg.pool_scope,
        "attention": encoder.attention,
        "fusion": encoder.fusion,
        "normalize": encoder.normalize,
        "processor": {
            "min_pixels": processor.patcher.min_pixels,
            "max_pixels": processor.patcher.max_pixels,
            "max_text_tokens": pcfg.max_text_tokens,
            "max_length": pcfg.max_length,
        },
        "text_format": "uniir",
        "temperature": float(temperature),
        "instructions": table,
    }


def _read(path: Path, fmt: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (not a directory exported by mmret?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        raise ValueError(f"{path}: format must be {fmt!r}, got {raw.get('format') if isinstance(raw, dict) else raw!r}")
    if int(raw.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: version {raw['version']} is newer than this code's ({VERSION})")
    return raw


def read_embedding_json(model_dir: str | Path) -> EmbeddingSpec:
    """The :class:`EmbeddingSpec` of an exported retriever; errors name the file and the key."""
    path = Path(model_dir) / EMBEDDING_FILE
    raw = _read(path, EMBEDDING_FORMAT)
    try:
        p = raw["processor"]
        processor = parse(
            ProcessorConfig,
            {
                "template": raw["template"],
                "min_pixels": p["min_pixels"],
                "max_pixels": p["max_pixels"],
                "max_text_tokens": p["max_text_tokens"],
                "max_length": p["max_length"],
                "pool_scope": raw["pool_scope"],
            },
        )
        encoder = parse(EncoderConfig, {k: raw[k] for k in ("pooling", "attention", "fusion", "normalize")})
        instructions = {str(k): tuple(v) for k, v in dict(raw.get("instructions", {})).items()}
        return EmbeddingSpec(processor, encoder, float(raw["temperature"]), bool(raw["for_eval"]), instructions)
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def reranker_json(prompt: RerankPrompt, yes_id: int, no_id: int, *, model_type: str, template: Any) -> dict[str, Any]:
    """The ``mmret_reranker.json`` of a reranker: its prompt, answer tokens and score rule."""
    return {
        "format": RERANKER_FORMAT,
        "version": VERSION,
        "model_type": model_type,
        "prompt": dataclasses.asdict(prompt),
        "yes_token_id": int(yes_id),
        "no_token_id": int(no_id),
        "template": dataclasses.asdict(template),
        "score": "softmax([logit(yes), logit(no)])[0] at the first answer position (after '<|im_start|>assistant\\n')",
    }
