"""The model card (``README.md``) of an exported run: what it is, how to load it, the recipe it was trained
with, its data and the run's evaluation table (the reports the run's evaluation wrote for that step)."""

from __future__ import annotations

import json

from mmret.atomic_dir import PathLike
from mmret.eval.report import REPORT_MD
from mmret.eval.run import eval_dir
from mmret.models.backbone import Backbone
from mmret.recipe import TrainerConfig, config_to_json

_LOAD = {
    "retriever": (
        "```python\n"
        "import mmret\n\n"
        'retriever = mmret.Retriever.from_pretrained("{path}")\n'
        'q = retriever.encode_queries(["a dog on a beach"], task="mscoco_task0")\n'
        'c = retriever.encode_candidates([{{"image": "dog.jpg"}}, {{"text": "A cat."}}])\n'
        "scores = q @ c.T  # cosine similarities\n"
        "```\n\n"
        "Without mmret: load the weights with `transformers.{cls}.from_pretrained`, render inputs as "
        "`mmret_embedding.json` describes (its `examples` show each prompt), run the language model with "
        "the attention it names and pool its last hidden states."
    ),
    "reranker": (
        "Load with `transformers.{cls}.from_pretrained`; render a (query, candidate) pair with the prompt in "
        "`mmret_reranker.json` and read P(yes) as its `score` says."
    ),
}


def _evaluation(workdir: PathLike, step: int, split: str) -> list[str]:
    out = eval_dir(workdir, step, split)
    found = sorted(p for p in out.glob(f"*/{REPORT_MD}")) if out.is_dir() else []
    if not found:
        return ["This step was not evaluated (run `python -m mmret.launch --mode=eval` before exporting)."]
    lines: list[str] = []
    for path in found:
        lines += [f"### {path.parent.name} pool", "", path.read_text(encoding="utf-8").strip(), ""]
    return lines


def model_card(cfg: TrainerConfig, workdir: PathLike, step: int, *, spec: Backbone, kind: str) -> str:
    """The card's Markdown (``kind``: ``retriever`` or ``reranker``)."""
    source = cfg.model.hf_dir or cfg.model.checkpoint or f"preset {cfg.model.preset}"
    data = cfg.data
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mmret, multimodal-retrieval, " + ("embedding" if kind == "retriever" else "reranker") + "]",
        "---",
        "",
        f"# mmret {kind}: {spec.name}",
        "",
        f"A {spec.name} {kind} trained with mmret (task `{cfg.task}`), exported from run `{workdir}` at step {step}:",
        f"plain `{spec.hf_model_class}` weights (LoRA merged), loadable without custom code.",
        "",
        "## Use",
        "",
        _LOAD[kind].format(path="<this directory>", cls=spec.hf_model_class),
        "",
        "## Recipe",
        "",
        f"- model source: `{source}`" + (f", after `{cfg.model.init_from}`" if cfg.model.init_from else ""),
        f"- template: `{cfg.data.processor.template_spec().name}`; encoder: {cfg.encoder.pooling} pooling, "
        f"{cfg.encoder.attention} attention, {cfg.encoder.fusion} fusion",
        f"- LoRA rank {cfg.lora.rank}"
        + (f", alpha {cfg.lora.alpha}" if cfg.lora.rank else " (full or partial fine-tuning)"),
        f"- optimiser: {json.dumps(config_to_json(cfg.optimizer))}",
        f"- steps: {cfg.total_steps}, {cfg.data.pipeline.batch_size} examples a host batch",
        "",
        "## Data",
        "",
        f"- `{data.root}` ({data.layout}, split `{data.split}`"
        + (f", tasks {', '.join(data.tasks)}" if data.tasks else "")
        + ")",
        *[f"- mixed: `{s.root}` ({s.layout}, weight {s.weight})" for s in data.mix],
        "",
        "## Evaluation",
        "",
        *_evaluation(workdir, step, cfg.eval.split),
        "",
    ]
    return "\n".join(lines)
