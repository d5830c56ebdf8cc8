"""Export a training run's checkpoint to a plain Hugging Face model directory.

    export_run(workdir, out, step=None)

The run's model is rebuilt from its recipe and the checkpoint restored (LoRA merged: plain weights). The
directory holds what the backbone's transformers class (``Backbone.hf_model_class``, e.g.
``Qwen2VLForConditionalGeneration``) loads with no custom code and no missing or unexpected keys:

- safetensors in the hub key layout; an untied LM head, which a retriever never trains or loads, is taken
  from the model source (``model.hf_dir``'s file; else the source's own model), its rows for tokens the
  processor added set to zero (a retriever reads no logits);
- ``config.json`` of the model source (``vocab_size`` the embedding's rows, ``dtype`` the written one);
- the run's tokenizer files with the tokens its template added, and its ``preprocessor_config.json`` with the
  run's pixel bounds, so the transformers processor resizes images as the run did;
- ``mmret_embedding.json`` (a retriever) or ``mmret_reranker.json`` (a reranker): :mod:`mmret.export.files`;
- ``README.md``: a model card (:mod:`mmret.export.card`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from mmret.atomic_dir import PathLike
from mmret.build import load_backbone, pair_renderer, processor_dir
from mmret.checkpoints import load_trained, load_trained_reranker, resolve_step, run_config
from mmret.convert import tables
from mmret.convert.checkpoint import HF_FILES, Progress, add_tokens_to_files, hf_files_dir, with_vocab_size
from mmret.convert.export import write_hub_dir
from mmret.convert.hf import SafetensorsCheckpoint
from mmret.convert.load import read_hf_config
from mmret.convert.table import to_ours
from mmret.data.processor import Processor
from mmret.data.rerank_prompts import get_prompt
from mmret.export.card import model_card
from mmret.export.files import EMBEDDING_FILE, RERANKER_FILE, embedding_json, reranker_json, run_instructions
from mmret.models import preset_config, registry
from mmret.models.params import flat_params
from mmret.recipe import ModelConfig, TrainerConfig

#: The run files copied into an export besides config.json (the tokenizer, processor and generation files).
RUN_FILES = tuple(name for name in HF_FILES if name != "config.json")


def source_config(m: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict of a run's model source (``model.hf_dir``, ``model.checkpoint`` or ``model.preset``)."""
    if m.hf_dir:
        return read_hf_config(m.hf_dir)
    if m.checkpoint:
        return read_hf_config(hf_files_dir(m.checkpoint))
    if m.preset:
        return preset_config(m.preset)
    raise ValueError("model: no model source (hf_dir, checkpoint or preset)")


def source_lm_head(cfg: TrainerConfig, table: Any, bcfg: Any, rows: int) -> np.ndarray:
    """The untied LM head of the run's model source in our layout, with ``rows`` vocabulary entries (rows
    beyond the source's are zero)."""
    spec = registry.of_config(bcfg)
    entry = next(e for e in table.entries(bcfg, with_lm_head=True) if e.path == spec.lm_head_path)
    if cfg.model.hf_dir:
        hub = SafetensorsCheckpoint(cfg.model.hf_dir).rekey(table.canonical_hub_key)
        head = hub.get(table.lm_head) if table.lm_head in hub.keys() else None
    else:
        head = None
    if head is None:  # a checkpoint or preset source (or a hub file without the head): the source's own model
        model = load_backbone(cfg.model, with_lm_head=True)
        kernel = np.asarray(flat_params(model)[spec.lm_head_path])
    else:
        kernel = to_ours(np.asarray(head), entry.kind)
    if kernel.shape[-1] < rows:
        kernel = np.concatenate([kernel, np.zeros((*kernel.shape[:-1], rows - kernel.shape[-1]), kernel.dtype)], -1)
    return kernel


def _preprocessor(raw: bytes, min_pixels: int, max_pixels: int) -> bytes:
    """``preprocessor_config.json`` with the run's pixel bounds (``min/max_pixels`` and ``size``)."""
    pre = json.loads(raw)
    pre["min_pixels"], pre["max_pixels"] = int(min_pixels), int(max_pixels)
    if isinstance(pre.get("size"), dict):
        if "shortest_edge" in pre["size"] or "longest_edge" in pre["size"]:
            pre["size"] = {**pre["size"], "shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    return (json.dumps(pre, indent=2) + "\n").encode()


def export_run(
    workdir: PathLike,
    out: PathLike,
    step: int | None = None,
    *,
    dtype: Any | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: Progress | None = None,
) -> epath.Path:
    """Write checkpoint ``step`` (None: the latest) of the run in ``workdir`` as a Hugging Face directory
    ``out`` (atomically; on any file system epath reaches, ``gs://...``); returns ``out``. A retriever run
    (tasks ``bi_encoder``, ``distill``) or a reranker
    run (task ``reranker``). ``dtype``: of the written tensors (default: the parameters')."""
    cfg = run_config(workdir)
    step = resolve_step(workdir, step)
    processor = Processor(processor_dir(cfg), cfg.data.processor)
    reranker = cfg.task == "reranker"
    if reranker:
        model = load_trained_reranker(cfg, workdir, step)
        backbone = model.backbone
    else:
        model = load_trained(cfg, workdir, step)
        backbone = model.encoder.backbone
    spec = registry.of_config(backbone.cfg)
    table = tables.get(spec.model_type)
    bcfg = backbone.cfg.replace(with_lm_head=True)
    params = {p: np.asarray(x) for p, x in flat_params(backbone).items()}
    rows = int(params[spec.embed_path].shape[0])
    if not bcfg.tie_word_embeddings and spec.lm_head_path not in params:
        params[spec.lm_head_path] = source_lm_head(cfg, table, bcfg, rows)
    if reranker:
        pairs = pair_renderer(processor, cfg.rerank)
        extra = reranker_json(
            get_prompt(cfg.rerank.prompt),
            pairs.yes_id,
            pairs.no_id,
            model_type=spec.model_type,
            template=processor.template,
        )
        extra_name = RERANKER_FILE
    else:
        temperature = float(model.temperature())
        extra = embedding_json(
            processor, cfg.encoder, temperature, model_type=spec.model_type, instructions=run_instructions(cfg)
        )
        extra_name = EMBEDDING_FILE
    config = source_config(cfg.model)
    with_vocab_size(config, rows)
    files: dict[str, bytes | Path] = {"config.json": (json.dumps(config, indent=2) + "\n").encode()}
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging)
        src = processor_dir(cfg)
        for name in RUN_FILES:
            if (src / name).is_file():
                (staged / name).write_bytes((src / name).read_bytes())
        if processor.added_tokens:
            add_tokens_to_files(staged, processor.added_tokens)
        pre = staged / "preprocessor_config.json"
        if pre.is_file():
            pre.write_bytes(_preprocessor(pre.read_bytes(), processor.patcher.min_pixels, processor.patcher.max_pixels))
        files.update({p.name: p.read_bytes() for p in sorted(staged.iterdir())})
    files[extra_name] = (json.dumps(extra, indent=2, ensure_ascii=False) + "\n").encode()
    files["README.md"] = model_card(
        cfg, workdir, step, spec=spec, kind="reranker" if reranker else "retriever"
    ).encode()
    return write_hub_dir(
        out,
        params,
        bcfg,
        table,
        files=files,
        where=f"{workdir} step {step}",
        max_shard_size=max_shard_size,
        dtype=dtype,
        force=force,
        progress=progress,
    )
