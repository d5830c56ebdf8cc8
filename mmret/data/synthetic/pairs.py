"""Synthetic roots of the three pair layouts (:mod:`mmret.data.sources`), offline and deterministic.

Every text describes a :mod:`~mmret.data.synthetic.scenes` scene, so each layout has signal to learn:

* ``nli`` (``nli_for_simcse.csv``): ``sent0`` describes a scene, ``sent1`` describes the same scene in
  other words (other synonyms, another object order, another frame), ``hard_neg`` describes the scene
  with one thing changed (:func:`~mmret.data.synthetic.scenes.perturb`): it contradicts ``sent0``.
* ``caption`` (``chat.json``, ``images/``): each record's caption is the description of the scene its PNG
  renders (lower case, no final period, as CC3M's captions are).
* ``beir`` (``corpus.jsonl``, ``queries.jsonl``, ``qrels/{train,test}.tsv``): each document describes a
  scene; each query asks for one object of its positive document's scene by its look and place, in the
  document's content words; every fifth query also has a score-0 judgement (not a positive).

The same sizes and seed give byte-identical files. :func:`write_synthetic_pairs` writes the three roots
at once (``tools/make_synthetic_pairs.py``); the ``write_*`` functions write one into a directory.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from etils import epath

from mmret.atomic_dir import PathLike, absolute, as_path, atomic_output_dir
from mmret.data.synthetic.scenes import (
    Scene,
    article,
    cell_phrase,
    look_phrase,
    perturb,
    random_scene,
    render,
    scene_phrase,
)

Dir = Path | epath.Path


@dataclass(frozen=True)
class PairScale:
    """Rows of each layout: NLI triplets, caption records, BEIR queries and documents."""

    nli: int
    captions: int
    queries: int
    documents: int


SCALES: dict[str, PairScale] = {
    "tiny": PairScale(nli=24, captions=16, queries=24, documents=32),
    "demo": PairScale(nli=400, captions=300, queries=300, documents=400),
}

#: The share of BEIR queries judged in ``qrels/train.tsv`` (the rest: ``qrels/test.tsv``).
TRAIN_SHARE = 0.8

_PARAPHRASES = ("There is {s}.", "The picture shows {s}.", "You can see {s}.", "In this image: {s}.")
_PROMPTS = (
    "Give a brief description of the image.\n<image>",
    "<image>\nDescribe the image concisely.",
    "Write a short caption for this picture.\n<image>",
)
_QUESTIONS = ("which picture has {o}?", "find the scene with {o}", "{o}", "show me {o}")


def _rng(seed: int, *parts: object) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed: stable across processes and PYTHONHASHSEED.
    return random.Random("mmret-synthetic-pairs/" + "/".join(str(p) for p in (seed, *parts)))


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _write(path: Dir, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8"))


def _jsonl(records: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ------------------------------------------------------------------------------------------------ nli


def nli_triplet(rng: random.Random) -> tuple[str, str, str]:
    """``(sent0, sent1, hard_neg)``: a scene, a paraphrase of it, and the scene with one thing changed."""
    scene = random_scene(rng, (1, 2))
    sent0 = _cap(scene_phrase(scene, rng)) + "."
    sent1 = rng.choice(_PARAPHRASES).format(s=scene_phrase(scene, rng))
    hard_neg = rng.choice(_PARAPHRASES).format(s=scene_phrase(perturb(scene, rng), rng))
    return sent0, sent1, hard_neg


def write_nli(root: Dir, rows: int, seed: int = 0) -> int:
    """Write ``root/nli_for_simcse.csv`` with ``rows`` triplets; returns ``rows``."""
    rng = _rng(seed, "nli")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("sent0", "sent1", "hard_neg"))
    writer.writerows(nli_triplet(rng) for _ in range(rows))
    _write(root / "nli_for_simcse.csv", out.getvalue())
    return rows


# -------------------------------------------------------------------------------------------- caption


def write_caption(root: Dir, records: int, seed: int = 0) -> int:
    """Write ``root/chat.json`` (LLaVA's CC3M-595K records) and one PNG per record under ``root/images``;
    returns ``records``."""
    rng = _rng(seed, "caption")
    (root / "images").mkdir(parents=True, exist_ok=True)
    chat = []
    for i in range(records):
        scene = random_scene(rng, (1, 3))
        name = f"SYN_train_{i:06d}"
        with (root / "images" / f"{name}.png").open("wb") as f:
            render(scene, rng.randrange(2**31)).save(f, format="PNG")
        turns = [{"from": "human", "value": rng.choice(_PROMPTS)}, {"from": "gpt", "value": scene_phrase(scene, rng)}]
        chat.append({"id": name, "image": f"{name}.png", "conversations": turns})
    _write(root / "chat.json", json.dumps(chat, indent=1) + "\n")
    return records


# ----------------------------------------------------------------------------------------------- beir


def _question(scene: Scene, rng: random.Random) -> str:
    obj = rng.choice(scene.objects)
    phrase = f"{article(look_phrase(obj, rng, size=True))} {cell_phrase(obj.cell, scene.grid, rng)}"
    return _cap(rng.choice(_QUESTIONS).format(o=phrase))


def write_beir(root: Dir, queries: int, documents: int, seed: int = 0) -> dict[str, int]:
    """Write a BEIR root of ``documents`` documents and ``queries`` queries (each with one positive, the
    first ``TRAIN_SHARE`` of them judged in ``qrels/train.tsv``, the rest in ``qrels/test.tsv``); returns
    the judgement lines per split."""
    if not 0 < queries <= documents:
        raise ValueError(f"beir: need 0 < queries <= documents, got {queries} queries and {documents} documents")
    rng = _rng(seed, "beir")
    scenes = [random_scene(rng, (1, 3), distinct_shapes=True) for _ in range(documents)]
    corpus = [
        {
            "_id": f"d{i}",
            "title": _cap(" and ".join(f"{o.colour} {o.shape}" for o in scene.objects)),
            "text": f"This picture shows {scene_phrase(scene, rng)}.",
        }
        for i, scene in enumerate(scenes)
    ]
    positive = rng.sample(range(documents), queries)
    query_lines = [{"_id": f"q{j}", "text": _question(scenes[d], rng)} for j, d in enumerate(positive)]
    n_train = max(1, round(queries * TRAIN_SHARE))
    qrels = {"train": ["query-id\tcorpus-id\tscore"], "test": ["query-id\tcorpus-id\tscore"]}
    for j, d in enumerate(positive):
        lines = qrels["train" if j < n_train else "test"]
        lines.append(f"q{j}\td{d}\t1")
        if j % 5 == 0 and documents > 1:
            other = rng.choice([i for i in range(documents) if i != d])
            lines.append(f"q{j}\td{other}\t0")
    _write(root / "corpus.jsonl", _jsonl(corpus))
    _write(root / "queries.jsonl", _jsonl(query_lines))
    for split, lines in qrels.items():
        _write(root / "qrels" / f"{split}.tsv", "".join(line + "\n" for line in lines))
    return {split: len(lines) - 1 for split, lines in qrels.items()}


# ---------------------------------------------------------------------------------------------- all three


@dataclass
class PairSummary:
    """What :func:`write_synthetic_pairs` wrote: the roots and their sizes, the wall time."""

    out: epath.Path
    scale: str
    seed: int
    sizes: PairScale
    qrels: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        """One line per root: its layout and what it holds."""
        s, out = self.sizes, self.out
        return "\n".join(
            (
                f"{out / 'nli'}: layout nli, {s.nli} rows (sent0, sent1, hard_neg)",
                f"{out / 'caption'}: layout caption, {s.captions} caption -> image records, {s.captions} images",
                f"{out / 'beir'}: layout beir, {s.documents} documents, {s.queries} queries, "
                + ", ".join(f"qrels/{k}.tsv {v} judgements" for k, v in self.qrels.items()),
            )
        )


def write_pairs(root: Dir, scale: str = "tiny", seed: int = 0) -> PairSummary:
    """Write ``root/nli``, ``root/caption`` and ``root/beir`` at ``scale`` (:data:`SCALES`)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {list(SCALES)}")
    sizes = SCALES[scale]
    write_nli(root / "nli", sizes.nli, seed)
    write_caption(root / "caption", sizes.captions, seed)
    qrels = write_beir(root / "beir", sizes.queries, sizes.documents, seed)
    return PairSummary(as_path(root), scale, seed, sizes, qrels)


def write_synthetic_pairs(out: PathLike, scale: str = "tiny", seed: int = 0, force: bool = False) -> PairSummary:
    """Write the three roots under ``out`` atomically (beside it, then renamed); ``force`` replaces it."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {list(SCALES)}")
    out = as_path(absolute(out))
    start = time.perf_counter()
    with atomic_output_dir(out, force=force) as tmp:
        summary = write_pairs(tmp, scale, seed)
    summary.out = out
    summary.seconds = time.perf_counter() - start
    return summary
