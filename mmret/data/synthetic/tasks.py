"""The 16 synthetic dataset-tasks: what each query asks, which candidates answer it, which ones only seem to.

Every generator returns a :class:`SplitData` of abstract queries and candidates. A query carries a semantic
``key``; a candidate carries the set of keys it answers. The writer labels as positives exactly the pool
candidates of the task's candidate modality whose keys contain the query's key, so labels are complete
(no unlabelled true positive can hide in a pool, whatever the generators put there).

Fusion by design (tasks 6, 7, 8 and the image+text candidates of task 2). Recall@5 forgives a tie among
five, so every single-modality reading must leave more than five equally good candidates:

* OVEN / InfoSeek (6, 8): the query image is a 3x3 board of 6-8 knowledge-base entities; the query text
  points at one of them by what it is, as the real questions do ("what is this bridge?"): by a shape, colour
  or texture that only that entity on the board has ("Which entity is the circle?", "Where does the striped
  one come from?"). The text alone fits every entity of the knowledge base with that value (more than five;
  of 64, about 8 per colour, 11 per shape, 16 per texture); the image alone fits its 6-8 entities. Boards
  come in pairs with the same occupied cells and two shared query texts whose value a different entity has
  on each board, and each board gets a third text of its own: equal images with different texts, and equal
  texts with different images, have different positives. Pointing by grid position ("the object in row 2,
  column 3") on 4x4 boards of 9-12 entities was the first design; the tiny demo model never learned it: its
  M-RoPE (theta 1e6 over 16-wide heads) turns image tokens by at most 0.03 rad per row and 2e-4 rad per
  column, and its vision tower has no absolute positions, so the cells look alike to it.
* CIRR / FashionIQ (7): groups of two references x three edit texts asked of both. Edits are drawn with a
  preference for relative ones that cannot be checked on the target alone ("move the star one cell up",
  "swap the colours of the circle and the square", "swap the main colour and the trim colour", "make it
  longer"); the pool holds the reference itself, its other edits (siblings: 7-8 look-alikes) and each text
  applied to unrelated images (traps).
* EDIS (2): groups of 8 headlines x 8 photos, every pairing a candidate: a candidate's headline comes with 7
  other photos and its photo with 7 other headlines, so neither part alone singles it out.
* WebQA (2): "which photo from <place> features <object>?" -> (photo of a piece, text naming the
  exhibition); groups of 9 exhibitions x 9 pieces with every pairing in the pool, so the text alone (the
  place) and the photo alone (the piece) each fit nine candidates.

Wrong-modality distractors: every pool also holds candidates of another modality that depict or state the
same thing as a positive (a caption of the target scene in a text->image pool, another rendering of the
query scene in an image->text pool, the headline alone and the photo alone in EDIS, ...), so a retriever
that ignores the instruction's modality cue is caught in the global pool.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mmret.data.mbeir import DATASET_IDS, DatasetTask
from mmret.data.synthetic.scenes import (
    COLOURS,
    FASHION_COLOURS,
    GARMENTS,
    LENGTHS,
    SCENE_BACKGROUNDS,
    SHAPES,
    SIZES,
    TEXTURES,
    Cell,
    Obj,
    Scene,
    article,
    attribute_word,
    garment_phrase,
    look_phrase,
    make_scene,
    perturb,
    random_object,
    random_scene,
    scene_phrase,
)

#: Lower-case dataset name (as in file names) -> display name (the instructions file's dataset column).
DISPLAY_NAMES: dict[str, str] = {
    "visualnews": "VisualNews",
    "fashion200k": "Fashion200K",
    "webqa": "WebQA",
    "edis": "EDIS",
    "nights": "NIGHTS",
    "oven": "OVEN",
    "infoseek": "InfoSeek",
    "fashioniq": "FashionIQ",
    "cirr": "CIRR",
    "mscoco": "MSCOCO",
}
#: Lower-case dataset name -> (dataset id, display name); the ids are the reader's (one format table).
DATASETS: dict[str, tuple[int, str]] = {name: (DATASET_IDS[name], DISPLAY_NAMES[name]) for name in DISPLAY_NAMES}
FUSION_TASK_IDS = frozenset({6, 7, 8})


# ------------------------------------------------------------------------------------------ abstract records


@dataclass(frozen=True)
class Picture:
    """An image file to be: a scene and its rendering seed (``None``: clean rendering)."""

    scene: Scene
    jitter: int | None = None


@dataclass
class Cand:
    """A candidate before ids: text and/or picture, the query keys it answers, and its kind (provenance)."""

    txt: str | None
    img: Picture | None
    keys: frozenset[Hashable]
    kind: str

    @property
    def modality(self) -> str:
        return modality_of(self.txt, self.img)


@dataclass
class Query:
    """A query before ids; ``hard_negs`` are pool candidates known not to answer it."""

    txt: str | None
    img: Picture | None
    key: Hashable
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    hard_negs: list[Cand] = field(default_factory=list)

    @property
    def modality(self) -> str:
        return modality_of(self.txt, self.img)


@dataclass
class SplitData:
    queries: list[Query]
    pool: list[Cand]


@dataclass(frozen=True)
class Entity:
    """A knowledge-base entry (shared by WebQA, OVEN and InfoSeek): a unique look and three facts."""

    name: str
    shape: str
    colour: str
    texture: str
    region: str
    material: str
    year: int

    @property
    def look(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"

    def obj(self, size: str, cell: Cell) -> Obj:
        return Obj(self.shape, self.colour, self.texture, size, cell)


@dataclass(frozen=True)
class Context:
    """What all tasks of one corpus share: the knowledge base."""

    kb: tuple[Entity, ...]


Generator = Callable[[random.Random, int, Context], SplitData]


def modality_of(txt: str | None, img: Picture | None) -> str:
    """M-BEIR modality string for the parts present."""
    if txt is not None and img is not None:
        return "image,text"
    if img is not None:
        return "image"
    if txt is not None:
        return "text"
    raise ValueError("a record needs a text or an image")


def _jit(rng: random.Random) -> int:
    return rng.getrandbits(31)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(text: str) -> str:
    text = _cap(text)
    return text if text.endswith((".", "?", "!")) else text + "."


def _finish(rng: random.Random, queries: list[Query], pool: list[Cand], n: int) -> SplitData:
    queries = queries[:n]
    rng.shuffle(queries)
    rng.shuffle(pool)
    return SplitData(queries, pool)


# --------------------------------------------------------------------------------------------- names, KB

_SYLLABLES = tuple("ka ve lo ri tu mo sa ne di po zu fe ga hi ja ru vo le mi no ta ze bo ku ra si do me".split())
_ENDINGS = ("", "", "n", "r", "s", "l")
REGIONS = ("north", "south", "east", "west", "coast", "highlands", "lowlands", "islands", "desert", "valley")
MATERIALS = ("copper", "oak", "glass", "clay", "silver", "stone", "wool", "bronze", "jade", "iron")
FACTS = ("region", "material", "year")
_EVENTS = (
    "opens a new bridge",
    "hosts the harvest festival",
    "wins the regional cup",
    "elects a new mayor",
    "celebrates its founding day",
    "unveils a statue",
    "reopens the old market",
    "holds a night parade",
    "launches a river ferry",
    "plants a memorial garden",
    "repairs the town clock",
    "welcomes a circus",
)


def make_names(rng: random.Random, n: int, used: set[str] | None = None) -> list[str]:
    """``n`` distinct made-up proper names (two or three syllables)."""
    used = set() if used is None else used
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))) + rng.choice(_ENDINGS)
        name = name.capitalize()
        if name not in used:
            used.add(name)
            out.append(name)
    return out


def make_kb(rng: random.Random, n: int) -> tuple[Entity, ...]:
    """``n`` entities with distinct looks (shape, colour, texture) and names."""
    looks = [(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES]
    if n > len(looks):
        raise ValueError(f"at most {len(looks)} entities, asked for {n}")
    names = make_names(rng, n)
    return tuple(
        Entity(name, s, c, t, rng.choice(REGIONS), rng.choice(MATERIALS), rng.randint(1700, 1999))
        for name, (s, c, t) in zip(names, rng.sample(looks, n), strict=True)
    )


def _passages(e: Entity) -> list[tuple[str, frozenset[Hashable], str]]:
    """The entity's passages: (text, keys answered, kind). Every passage names the entity and its look."""
    return [
        (
            f"{e.name} is {article(e.look)} from the {e.region}.",
            frozenset({(e.name, "what"), (e.name, "region")}),
            "summary",
        ),
        (f"The {e.look} called {e.name} has its origin in the {e.region}.", frozenset({(e.name, "region")}), "origin"),
        (f"{e.name}, the {e.look}, is made of {e.material}.", frozenset({(e.name, "material")}), "material"),
        (f"{e.name}, the {e.look}, was first recorded in {e.year}.", frozenset({(e.name, "year")}), "year"),
    ]


def _summary(e: Entity) -> tuple[str, frozenset[Hashable], str]:
    return _passages(e)[0]


def _entity_picture(e: Entity) -> Picture:
    return Picture(make_scene([e.obj("large", (0, 0))], "grey", (1, 1), 56, 56))


def _fact_question(fact: str, subject: str, rng: random.Random) -> str:
    options = {
        "region": (f"Where does {subject} come from?", f"Which region is {subject} from?"),
        "material": (f"What is {subject} made of?", f"Which material is {subject} made from?"),
        "year": (f"When was {subject} first recorded?", f"In which year was {subject} first recorded?"),
        "what": (f"What is {subject}?", f"Which entity is {subject}?", f"Name {subject}."),
    }[fact]
    return _cap(rng.choice(options))


# ----------------------------------------------------------------------------------------- scene captions

_CAPTION_STYLES: dict[str, tuple[str, ...]] = {
    "news": ("{s}", "News photo of {s}", "Pictured: {s}", "Scene from the day: {s}"),
    "coco": ("{s}", "A picture of {s}", "There is {s}", "An image showing {s}"),
}


def caption(scene: Scene, rng: random.Random, style: str) -> str:
    """A full description of ``scene`` in a dataset's style (no final period)."""
    return _cap(rng.choice(_CAPTION_STYLES[style]).format(s=scene_phrase(scene, rng)))


def _captions(scene: Scene, rng: random.Random, style: str, k: int) -> list[str]:
    out: list[str] = []
    for _ in range(20 * k):
        text = _sentence(caption(scene, rng, style))
        if text not in out:
            out.append(text)
        if len(out) == k:
            break
    return out


# ------------------------------------------------------------------------------- tasks 0, 3 (scenes)


def scene_t2i(style: str, captions_per_image: int) -> Generator:
    """Caption -> photo (VisualNews, MSCOCO task 0). Pool: the photos, one-change near-duplicates, captions."""

    def gen(rng: random.Random, n: int, ctx: Context) -> SplitData:
        queries: list[Query] = []
        pool: list[Cand] = []
        for step in itertools.count():
            if len(queries) >= n:
                break
            scene = random_scene(rng, (1, 3))
            near = perturb(scene, rng)
            neg = Cand(None, Picture(near, _jit(rng)), frozenset({near}), "photo")
            pool += [Cand(None, Picture(scene, _jit(rng)), frozenset({scene}), "photo"), neg]
            for _ in range(captions_per_image):
                queries.append(Query(caption(scene, rng, style), None, scene, "caption", hard_negs=[neg]))
            if step % 2 == 0:  # wrong modality: the same scene, as text
                pool.append(Cand(_sentence(caption(scene, rng, style)), None, frozenset({scene}), "caption"))
        for _ in range(n // 2 + 8):
            extra = random_scene(rng, (1, 3))
            pool.append(Cand(None, Picture(extra, _jit(rng)), frozenset({extra}), "photo"))
        return _finish(rng, queries, pool, n)

    return gen


def scene_i2t(style: str, captions_per_image: int) -> Generator:
    """Photo -> caption (VisualNews, MSCOCO task 3; MSCOCO has several positive captions per photo)."""

    def gen(rng: random.Random, n: int, ctx: Context) -> SplitData:
        queries: list[Query] = []
        pool: list[Cand] = []
        for step in itertools.count():
            if len(queries) >= n:
                break
            scene = random_scene(rng, (1, 3))
            near = perturb(scene, rng)
            neg = Cand(_sentence(caption(near, rng, style)), None, frozenset({near}), "caption")
            pool += [
                Cand(t, None, frozenset({scene}), "caption") for t in _captions(scene, rng, style, captions_per_image)
            ]
            pool.append(neg)
            queries.append(Query(None, Picture(scene, _jit(rng)), scene, "photo", hard_negs=[neg]))
            if step % 2 == 0:  # wrong modality: another rendering of the query scene
                pool.append(Cand(None, Picture(scene, _jit(rng)), frozenset({scene}), "photo"))
        for _ in range(n // 2 + 8):
            extra = random_scene(rng, (1, 3))
            pool.append(Cand(_sentence(caption(extra, rng, style)), None, frozenset({extra}), "caption"))
        return _finish(rng, queries, pool, n)

    return gen


# ----------------------------------------------------------------------------------------------- garments


def random_garment(rng: random.Random, *, accent: bool, kind: str | None = None) -> Scene:
    """One garment on a studio backdrop (84 x 112, portrait)."""
    colours = list(FASHION_COLOURS)
    colour = rng.choice(colours)
    trim = rng.choice([c for c in colours if c != colour]) if accent else None
    obj = Obj(kind or rng.choice(GARMENTS), colour, rng.choice(TEXTURES), rng.choice(LENGTHS), (0, 0), trim)
    return make_scene([obj], "studio", (1, 1), 84, 112)


def _garment(scene: Scene) -> Obj:
    return scene.objects[0]


def perturb_garment(scene: Scene, rng: random.Random) -> Scene:
    """The garment with one of type, colour, texture or length changed."""
    g = _garment(scene)
    what = rng.choice(("shape", "colour", "colour", "texture", "size"))
    pool = {
        "shape": GARMENTS,
        "colour": [c for c in FASHION_COLOURS if c != g.accent],
        "texture": TEXTURES,
        "size": LENGTHS,
    }[what]
    return scene.with_objects([replace(g, **{what: rng.choice([v for v in pool if v != getattr(g, what)])})])


def _product_text(scene: Scene, rng: random.Random) -> str:
    g = _garment(scene)
    phrase = garment_phrase(g, rng)
    return _cap(rng.choice((phrase, f"{phrase}, studio shot", f"women's {phrase}", f"classic {phrase}")))


def fashion_t2i(rng: random.Random, n: int, ctx: Context) -> SplitData:
    """Fashion200K task 0: product text -> product photo; some products have two photos (two positives)."""
    queries: list[Query] = []
    pool: list[Cand] = []
    for step in itertools.count():
        if len(queries) >= n:
            break
        g = random_garment(rng, accent=False)
        near = perturb_garment(g, rng)
        neg = Cand(None, Picture(near, _jit(rng)), frozenset({near}), "product_photo")
        photos = 2 if rng.random() < 0.3 else 1
        pool += [Cand(None, Picture(g, _jit(rng)), frozenset({g}), "product_photo") for _ in range(photos)]
        pool.append(neg)
        queries.append(Query(_product_text(g, rng), None, g, "product_text", hard_negs=[neg]))
        if step % 2 == 0:
            pool.append(Cand(_sentence(_product_text(g, rng)), None, frozenset({g}), "product_text"))
    for _ in range(n // 2 + 8):
        extra = random_garment(rng, accent=False)
        pool.append(Cand(None, Picture(extra, _jit(rng)), frozenset({extra}), "product_photo"))
    return _finish(rng, queries, pool, n)


def fashion_i2t(rng: random.Random, n: int, ctx: Context) -> SplitData:
    """Fashion200K task 3: product photo -> product text."""
    queries: list[Query] = []
    pool: list[Cand] = []
    for step in itertools.count():
        if len(queries) >= n:
            break
        g = random_garment(rng, accent=False)
        near = perturb_garment(g, rng)
        neg = Cand(_sentence(_product_text(near, rng)), None, frozenset({near}), "product_text")
        pool += [Cand(_sentence(_product_text(g, rng)), None, frozenset({g}), "product_text"), neg]
        queries.append(Query(None, Picture(g, _jit(rng)), g, "product_photo", hard_negs=[neg]))
        if step % 2 == 0:
            pool.append(Cand(None, Picture(g, _jit(rng)), frozenset({g}), "product_photo"))
    for _ in range(n // 2 + 8):
        extra = random_garment(rng, accent=False)
        pool.append(Cand(_sentence(_product_text(extra, rng)), None, frozenset({extra}), "product_text"))
    return _finish(rng, queries, pool, n)


# ------------------------------------------------------------------------------------- knowledge base tasks


def _kb_texts(kb: Sequence[Entity], *, summaries_only: bool) -> list[Cand]:
    out = []
    for e in kb:
        for text, keys, kind in [_summary(e)] if summaries_only else _passages(e):
            out.append(Cand(text, None, keys, kind))
    return out


def _kb_cards(kb: Sequence[Entity], *, summaries_only: bool) -> list[Cand]:
    out = []
    for e in kb:
        for text, keys, kind in [_summary(e)] if summaries_only else _passages(e):
            out.append(Cand(text, _entity_picture(e), keys, f"{kind}_card"))
    return out


def _kb_pictures(rng: random.Random, kb: Sequence[Entity], fraction: float) -> list[Cand]:
    chosen = rng.sample(list(kb), max(1, int(len(kb) * fraction)))
    return [Cand(None, _entity_picture(e), frozenset({(e.name, "what")}), "entity_photo") for e in chosen]


def webqa_t2t(rng: random.Random, n: int, ctx: Context) -> SplitData:
    """WebQA task 1: a question naming an entity -> the passages stating the asked fact (region: two)."""
    pool = _kb_texts(ctx.kb, summaries_only=False)
    pool += _kb_pictures(rng, ctx.kb, 0.25) + rng.sample(_kb_cards(ctx.kb, summaries_only=True), len(ctx.kb) // 4)
    queries = []
    for _ in range(n):
        e = rng.choice(ctx.kb)
        fact = rng.choice(FACTS)
        negs = [c for c in pool if c.txt and c.img is None and e.name in c.txt and (e.name, fact) not in c.keys]
        queries.append(
            Query(_fact_question(fact, e.name, rng), None, (e.name, fact), "question", {"fact": fact}, negs[:3])
        )
    return _finish(rng, queries, pool, n)


# ----------------------------------------------------------------------------------- OVEN / InfoSeek boards


@dataclass
class _Board:
    scene: Scene
    entities: dict[Cell, Entity]


#: What a board question may name its object by; the value it names is unique on the board.
POINTER_VALUES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES}
Pointer = tuple[str, str]  # (attribute, value), e.g. ("colour", "red")


def _pointer_phrase(pointer: Pointer, rng: random.Random) -> str:
    """The pointer as words: "the circle", "the red object", "the striped one", ..."""
    attr, value = pointer
    word = attribute_word(attr, value, rng)
    if attr == "shape":
        return rng.choice((f"the {word}", f"the {word} in the picture"))
    return rng.choice((f"the {word} object", f"the {word} one", f"the {word} object in the picture"))


def _unique_pointers(entities: Sequence[Entity]) -> dict[Pointer, Entity]:
    """Every (attribute, value) that exactly one of ``entities`` has, with that entity."""
    seen: dict[Pointer, list[Entity]] = {}
    for e in entities:
        for attr in POINTER_VALUES:
            seen.setdefault((attr, getattr(e, attr)), []).append(e)
    return {p: es[0] for p, es in seen.items() if len(es) == 1}


#: Training queries of the board tasks per the scale's one: their pool is the knowledge base, whatever the number
#: of queries, and reading a board generalises only from many boards (as in M-BEIR, where OVEN and InfoSeek
#: have the largest training sets).
BOARD_TRAIN_MULTIPLE = 2
#: Board grid (rows, columns), image side in pixels, and how many of its cells hold an entity.
BOARD_GRID = (3, 3)
BOARD_SIDE = 84
BOARD_ENTITIES = (6, 8)
#: A pointer's value must fit more than this many knowledge-base entities (so the text alone leaves ties).
TEXT_TIES = 5


def _has(e: Entity, p: Pointer) -> bool:
    return getattr(e, p[0]) == p[1]


def _text_tied(kb: Sequence[Entity]) -> set[Pointer]:
    """The pointers whose value more than ``TEXT_TIES`` knowledge-base entities have (the only ones asked)."""
    return {
        (a, v)
        for a, values in POINTER_VALUES.items()
        for v in values
        if sum(getattr(e, a) == v for e in kb) > TEXT_TIES
    }


def _board_pair(
    rng: random.Random, kb: Sequence[Entity], tied: set[Pointer]
) -> tuple[tuple[_Board, _Board], list[Pointer]]:
    """Two boards with the same occupied cells and two shared pointers (from ``tied``): on each board one
    entity has the pointer's value and no other does, and the two boards' entities for a pointer differ."""
    grid = [(r, c) for r in range(BOARD_GRID[0]) for c in range(BOARD_GRID[1])]
    cells = rng.sample(grid, rng.randint(*BOARD_ENTITIES))
    while True:
        pointers = [(a, rng.choice(POINTER_VALUES[a])) for a in rng.sample(list(POINTER_VALUES), 2)]
        fillers = [e for e in kb if not any(_has(e, p) for p in pointers)]
        fits = [[e for e in kb if _has(e, p) and not _has(e, q)] for p, q in (pointers, pointers[::-1])]
        if all(p in tied for p in pointers) and len(fillers) >= 2 * len(cells) and all(len(f) >= 2 for f in fits):
            break
    targets = [rng.sample(f, 2) for f in fits]  # [pointer][board]
    boards = []
    for b in range(2):
        ents = [targets[0][b], targets[1][b], *rng.sample(fillers, len(cells) - 2)]
        rng.shuffle(ents)
        placed = dict(zip(cells, ents, strict=True))
        objs = [e.obj(rng.choice(SIZES), cell) for cell, e in placed.items()]
        scene = make_scene(objs, rng.choice(SCENE_BACKGROUNDS), BOARD_GRID, BOARD_SIDE, BOARD_SIDE)
        boards.append(_Board(scene, placed))
    return (boards[0], boards[1]), pointers


def _board_queries(rng: random.Random, kb: Sequence[Entity], n: int, info: bool) -> list[Query]:
    """Pairs of boards, three questions each: two pointers shared by both boards of the pair (equal texts,
    different answers) and one of the board's own (another value only one of its entities has)."""
    queries: list[Query] = []
    tied = _text_tied(kb)
    while len(queries) < n:
        pair, shared_pointers = _board_pair(rng, kb, tied)
        shared = []
        for pointer in shared_pointers:
            fact = rng.choice(FACTS) if info else "what"
            shared.append((_fact_question(fact, _pointer_phrase(pointer, rng), rng), pointer, fact))
        for board in pair:
            picture = Picture(board.scene, _jit(rng))
            unique = _unique_pointers(list(board.entities.values()))
            asks = list(shared)
            own = sorted(p for p in unique if p not in shared_pointers and p in tied)
            if own:
                pointer = rng.choice(own)
                fact = rng.choice(FACTS) if info else "what"
                asks.append((_fact_question(fact, _pointer_phrase(pointer, rng), rng), pointer, fact))
            for text, pointer, fact in asks:
                e = unique[pointer]
                cell = next(c for c, o in board.entities.items() if o == e)
                others = [o.name for c, o in board.entities.items() if c != cell]
                meta = {"fact": fact, "pointer": list(pointer), "cell": list(cell), "board_entities": others}
                queries.append(Query(text, picture, (e.name, fact), "board_question", meta))
    return queries


def _hard_negs_from(pool: Sequence[Cand], names: Sequence[str], fact: str, modality: str) -> list[Cand]:
    """Candidates about other entities of the same board and the same fact (what the image alone suggests)."""
    wanted = set(names[:3])
    return [c for c in pool if c.modality == modality and any(k[0] in wanted and k[1] == fact for k in c.keys)]


def board_task(info: bool, candidate: str) -> Generator:
    """OVEN (``info=False``: which entity) / InfoSeek (``info=True``: a fact of it), task 6 or 8."""

    def gen(rng: random.Random, n: int, ctx: Context) -> SplitData:
        only_summary = not info
        texts = _kb_texts(ctx.kb, summaries_only=only_summary)
        cards = _kb_cards(ctx.kb, summaries_only=only_summary)
        pool, other = (texts, cards) if candidate == "text" else (cards, texts)
        wrong = _kb_pictures(rng, ctx.kb, 0.3) + rng.sample(other, len(ctx.kb) // 3)
        queries = _board_queries(rng, ctx.kb, n, info)
        for q in queries:
            q.hard_negs = _hard_negs_from(pool, q.meta["board_entities"], q.meta["fact"], pool[0].modality)
        return _finish(rng, queries, pool + wrong, n)

    return gen


# --------------------------------------------------------------------------------------------- task 2

#: EDIS groups are GRID headlines x GRID photos, all pairings in the pool.
EDIS_GRID = 8
#: WebQA task 2 groups: photos per exhibition; each holds the three objects that queries ask about.
WEBQA_PHOTOS = 9


def _headlines(rng: random.Random, k: int, used: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        text = f"{make_names(rng, 1)[0]} {rng.choice(_EVENTS)}"
        if text not in used:
            used.add(text)
            out.append(text)
    return out


def edis_t2it(rng: random.Random, n: int, ctx: Context) -> SplitData:
    """EDIS task 2: a story (headline + what its photo shows) -> the (photo, headline) news item.

    Groups of 8 headlines x 8 photos with every pairing in the pool: a candidate's headline also comes with
    7 other photos and its photo with 7 other headlines, so neither part alone singles it out.
    """
    queries: list[Query] = []
    pool: list[Cand] = []
    used: set[str] = set()
    while len(queries) < n:
        heads = _headlines(rng, EDIS_GRID, used)
        scenes = [random_scene(rng, (1, 2)) for _ in range(EDIS_GRID)]
        pictures = [Picture(s, _jit(rng)) for s in scenes]
        group = {
            (h, s): Cand(h, p, frozenset({(h, s)}), "news_item")
            for h in heads
            for s, p in zip(scenes, pictures, strict=True)
        }
        pool += list(group.values())
        pairs = list(group)
        rng.shuffle(pairs)
        for h, s in pairs[: n - len(queries)]:
            template = rng.choice(("{h}, with a photo of {s}", "Story: {h}. Photo: {s}", "{h} ({s} in the photo)"))
            negs = [c for key, c in group.items() if key != (h, s) and (key[0] == h or key[1] == s)]
            query = Query(_cap(template.format(h=h, s=scene_phrase(s, rng))), None, (h, s), "story")
            query.hard_negs = rng.sample(negs, 3)
            queries.append(query)
        for k in range(2):  # wrong modality: headlines alone, photos alone
            pool.append(Cand(heads[k], None, frozenset({(heads[k], None)}), "headline"))
            pool.append(Cand(None, pictures[k], frozenset({(None, scenes[k])}), "news_photo"))
    return _finish(rng, queries, pool, n)


def _exhibit_text(place: str, rng: random.Random) -> str:
    return rng.choice(
        (
            f"Photo from the {place} exhibition.",
            f"{place} exhibition photo.",
            f"A piece shown at the {place} exhibition.",
        )
    )


def webqa_t2it(rng: random.Random, n: int, ctx: Context) -> SplitData:
    """WebQA task 2: "which photo from <place> features <object>?" -> (photo of the piece, text naming the
    exhibition).

    Groups of 9 exhibitions x 9 pieces with every pairing in the pool (each its own rendering): a candidate's
    text also comes with the 8 other pieces and its piece with the 8 other exhibitions, so neither part alone
    singles it out.
    """
    queries: list[Query] = []
    pool: list[Cand] = []
    used: set[str] = set()

    def key(p: str, o: Obj) -> tuple[str, tuple[str, str, str, str]]:
        return (p, (o.size, *o.look))

    while len(queries) < n:
        places = make_names(rng, WEBQA_PHOTOS, used)
        looks: dict[tuple[str, str, str], Obj] = {}
        while len(looks) < WEBQA_PHOTOS:
            obj = random_object(rng, (0, 0))
            looks.setdefault(obj.look, obj)
        pieces = list(looks.values())
        group = {
            key(p, o): Cand(
                _exhibit_text(p, rng),
                Picture(make_scene([o], rng.choice(SCENE_BACKGROUNDS), (1, 1), 56, 56), _jit(rng)),
                frozenset({key(p, o)}),
                "exhibit",
            )
            for p in places
            for o in pieces
        }
        pool += list(group.values())
        pairs = [(p, o) for p in places for o in pieces]
        rng.shuffle(pairs)
        for p, o in pairs[: n - len(queries)]:
            asked = key(p, o)
            phrase = article(look_phrase(o, rng, size=True))
            text = rng.choice(
                (
                    f"Which photo from the {p} exhibition features {phrase}?",
                    f"{p} exhibition: the photo of {phrase}",
                )
            )
            negs = [c for k, c in group.items() if k != asked and (k[0] == p or k[1] == asked[1])]
            queries.append(Query(text, None, asked, "exhibit_question", hard_negs=rng.sample(negs, 3)))
        for k in range(2):  # wrong modality: the photo alone, the text alone
            shown = group[key(places[k], pieces[k])]
            pool += [
                Cand(None, shown.img, frozenset(), "exhibit_photo"),
                Cand(shown.txt, None, frozenset(), "exhibit_text"),
            ]
    return _finish(rng, queries, pool, n)


# ------------------------------------------------------------------------------------------------ task 4


def nights_i2i(rng: random.Random, n: int, ctx: Context) -> SplitData:
    """NIGHTS task 4: a rendering -> another rendering of the same scene. Near-duplicates (one change) are
    drawn with the query's own jitter, so they are closer in pixels than the positive."""
    queries: list[Query] = []
    pool: list[Cand] = []
    for step in itertools.count():
        if len(queries) >= n:
            break
        scene = random_scene(rng, (2, 4))
        jitter = _jit(rng)
        negs = []
        for _ in range(2):
            near = perturb(scene, rng)
            negs.append(Cand(None, Picture(near, jitter), frozenset({near}), "rendering"))
        pool += [Cand(None, Picture(scene, _jit(rng)), frozenset({scene}), "rendering"), *negs]
        queries.append(Query(None, Picture(scene, jitter), scene, "rendering", hard_negs=negs))
        if step % 2 == 0:
            pool.append(Cand(_sentence(caption(scene, rng, "coco")), None, frozenset({scene}), "caption"))
    for _ in range(n // 2 + 8):
        extra = random_scene(rng, (2, 4))
        pool.append(Cand(None, Picture(extra, _jit(rng)), frozenset({extra}), "rendering"))
    return _finish(rng, queries, pool, n)


# ------------------------------------------------------------------------------------------------ task 7

#: An edit: its text, the function scene -> edited scene (``None``: does not apply), and a sampling weight.
#: Relative edits (move, swap, longer) cannot be checked on the target alone and weigh more.
Edit = tuple[str, Callable[[Scene], Scene | None], float]
_MOVES = {
    "left": ((0, -1), "to the left"),
    "right": ((0, 1), "to the right"),
    "up": ((-1, 0), "up"),
    "down": ((1, 0), "down"),
}


def _by_shape(scene: Scene, shape: str) -> Obj | None:
    found = [o for o in scene.objects if o.shape == shape]
    return found[0] if len(found) == 1 else None


def _set(scene: Scene, obj: Obj, **changes: Any) -> Scene:
    return scene.with_objects([o for o in scene.objects if o is not obj] + [replace(obj, **changes)])


def _pair_edit(a: str, b: str, attr: str, swap: bool) -> Callable[[Scene], Scene | None]:
    """Copy ``attr`` of the ``b`` onto the ``a`` (``swap``: exchange it; ``attr="cell"``: their places)."""

    def apply(scene: Scene) -> Scene | None:
        oa, ob = _by_shape(scene, a), _by_shape(scene, b)
        if oa is None or ob is None or getattr(oa, attr) == getattr(ob, attr):
            return None
        rest = [o for o in scene.objects if o is not oa and o is not ob]
        new_b = replace(ob, **{attr: getattr(oa, attr)}) if swap else ob
        return scene.with_objects([*rest, replace(oa, **{attr: getattr(ob, attr)}), new_b])

    return apply


def _move(a: str, delta: tuple[int, int]) -> Callable[[Scene], Scene | None]:
    def apply(scene: Scene) -> Scene | None:
        oa = _by_shape(scene, a)
        if oa is None:
            return None
        cell = (oa.cell[0] + delta[0], oa.cell[1] + delta[1])
        if cell not in scene.free_cells():
            return None
        return _set(scene, oa, cell=cell)

    return apply


def _remove(a: str) -> Callable[[Scene], Scene | None]:
    def apply(scene: Scene) -> Scene | None:
        oa = _by_shape(scene, a)
        if oa is None or len(scene.objects) < 2:
            return None
        return scene.with_objects([o for o in scene.objects if o is not oa])

    return apply


def _set_attr(a: str, attr: str, value: str) -> Callable[[Scene], Scene | None]:
    def apply(scene: Scene) -> Scene | None:
        oa = _by_shape(scene, a)
        if oa is None or getattr(oa, attr) == value:
            return None
        return _set(scene, oa, **{attr: value})

    return apply


def _scene_edits(scene: Scene, rng: random.Random) -> list[Edit]:
    """Every edit of ``scene`` (objects named by shape); texts phrased at random."""
    shapes = [o.shape for o in scene.objects]
    out: list[Edit] = []
    for a in shapes:
        for delta, words in _MOVES.values():
            out.append(
                (
                    rng.choice((f"move the {a} one cell {words}", f"shift the {a} one step {words}")),
                    _move(a, delta),
                    3.0,
                )
            )
        out.append((rng.choice((f"remove the {a}", f"take away the {a}")), _remove(a), 1.0))
        colour = rng.choice(list(COLOURS))
        out.append((f"make the {a} {colour}", _set_attr(a, "colour", colour), 1.0))
    for a, b in itertools.permutations(shapes, 2):
        out.append(
            (
                rng.choice((f"paint the {a} the colour of the {b}", f"make the {a} the same colour as the {b}")),
                _pair_edit(a, b, "colour", swap=False),
                1.0,
            )
        )
        out.append((f"give the {a} the pattern of the {b}", _pair_edit(a, b, "texture", swap=False), 1.0))
    for a, b in itertools.combinations(shapes, 2):
        out.append(
            (
                rng.choice((f"swap the {a} and the {b}", f"let the {a} and the {b} trade places")),
                _pair_edit(a, b, "cell", swap=True),
                3.0,
            )
        )
        out.append(
            (
                rng.choice((f"swap the colours of the {a} and the {b}", f"the {a} and the {b} exchange colours")),
                _pair_edit(a, b, "colour", swap=True),
                3.0,
            )
        )
        out.append((f"swap the patterns of the {a} and the {b}", _pair_edit(a, b, "texture", swap=True), 3.0))
        out.append((f"swap the sizes of the {a} and the {b}", _pair_edit(a, b, "size", swap=True), 2.0))
    return out


def _scene_with(rng: random.Random, shapes: Sequence[str]) -> Scene:
    """A random scene of distinct shapes that includes ``shapes``."""
    scene = random_scene(rng, (max(2, len(shapes)), 3), distinct_shapes=True)
    others = [s for s in SHAPES if s not in shapes]
    rng.shuffle(others)
    wanted = list(shapes) + others
    return scene.with_objects([replace(o, shape=wanted[i]) for i, o in enumerate(scene.objects)])


def _as_noun(kind: str) -> str:
    return "trousers" if kind == "trousers" else article(kind)


def _garment_edits(scene: Scene, rng: random.Random) -> list[Edit]:
    """Every edit of a garment; texts phrased at random."""
    kind = _garment(scene).shape

    def swap_colours(s: Scene) -> Scene | None:
        g = _garment(s)
        return None if g.accent in (None, g.colour) else _set(s, g, colour=g.accent, accent=g.colour)

    def body_to_trim(s: Scene) -> Scene | None:
        g = _garment(s)
        return None if g.accent in (None, g.colour) else _set(s, g, colour=g.accent)

    def trim_to_body(s: Scene) -> Scene | None:
        g = _garment(s)
        return None if g.accent in (None, g.colour) else _set(s, g, accent=g.colour)

    def length(step: int) -> Callable[[Scene], Scene | None]:
        def apply(s: Scene) -> Scene | None:
            k = LENGTHS.index(_garment(s).size) + step
            return _set(s, _garment(s), size=LENGTHS[k]) if 0 <= k < len(LENGTHS) else None

        return apply

    def field_to(attr: str, value: str) -> Callable[[Scene], Scene | None]:
        return lambda s: None if getattr(_garment(s), attr) == value else _set(s, _garment(s), **{attr: value})

    out: list[Edit] = [
        (
            rng.choice(("swap the main colour and the trim colour", "the colours of body and trim are exchanged")),
            swap_colours,
            3.0,
        ),
        (rng.choice(("make it longer", "is longer, otherwise the same")), length(1), 3.0),
        (rng.choice(("make it shorter", "is shorter, otherwise the same")), length(-1), 3.0),
        (
            rng.choice(("make the whole garment the colour of its trim", "the body takes the trim's colour")),
            body_to_trim,
            1.0,
        ),
        (rng.choice(("make the trim match the rest", "the trim is the same colour as the body")), trim_to_body, 1.0),
    ]
    for other in rng.sample([g for g in GARMENTS if g != kind], 2):
        out.append((f"same colours, pattern and length, but as {_as_noun(other)}", field_to("shape", other), 2.0))
    for texture in TEXTURES:
        out.append((f"keep the colours but make it {texture}", field_to("texture", texture), 1.0))
    for colour in rng.sample(list(FASHION_COLOURS), 3):
        out.append((f"is {colour} with the same trim", field_to("colour", colour), 1.0))
    return out


def _weighted_sample(rng: random.Random, items: Sequence[Edit], k: int) -> list[Edit]:
    pool, out = list(items), []
    while pool and len(out) < k:
        pick = rng.choices(range(len(pool)), weights=[e[2] for e in pool])[0]
        out.append(pool.pop(pick))
    return out


#: Composed groups: edit texts asked of both references, extra edits (siblings) per reference, traps per text.
COMPOSED_TEXTS, COMPOSED_SIBLINGS, COMPOSED_TRAPS = 3, 4, 2


def _composed(
    rng: random.Random,
    n: int,
    make_refs: Callable[[], tuple[Scene, Scene]],
    edits_of: Callable[[Scene, random.Random], list[Edit]],
    trap_scene: Callable[[Scene], Scene],
    describe: Callable[[Scene], str],
    photo_kind: str,
) -> SplitData:
    """Composed retrieval: groups of two references x three edit texts asked of both.

    Pool per group: the six targets; the references themselves; four more edits of each reference (siblings:
    with the reference and the other targets, 7-8 candidates that look like the query image); each text
    applied to two unrelated images (traps: fit the text alone); captions of targets (wrong modality).
    """
    queries: list[Query] = []
    pool: list[Cand] = []
    for step in itertools.count():
        if len(queries) >= n:
            break
        refs = make_refs()
        shared = [e for e in edits_of(refs[0], rng) if all(e[1](r) not in (None, r) for r in refs)]
        chosen = _weighted_sample(rng, shared, COMPOSED_TEXTS)
        if len(chosen) < COMPOSED_TEXTS:
            continue
        asked = [[e[1](r) for e in chosen] for r in refs]
        if any(len(set(ts)) < COMPOSED_TEXTS for ts in asked):
            continue
        traps: list[list[Cand]] = []
        for _text, fn, _ in chosen:
            found: list[Cand] = []
            for _ in range(2 * COMPOSED_TRAPS):
                target = fn(trap_scene(refs[0]))
                if target is not None:
                    found.append(Cand(None, Picture(target, _jit(rng)), frozenset({target}), photo_kind))
                if len(found) == COMPOSED_TRAPS:
                    break
            traps.append(found)
            pool += found
        for ref, targets in zip(refs, asked, strict=True):
            ref_pic = Picture(ref, _jit(rng))
            ref_cand = Cand(None, ref_pic, frozenset({ref}), photo_kind)
            cands = [Cand(None, Picture(t, _jit(rng)), frozenset({t}), photo_kind) for t in targets]
            others = [e for e in edits_of(ref, rng) if e[1](ref) not in (None, ref, *targets)]
            siblings = []
            for e in _weighted_sample(rng, others, COMPOSED_SIBLINGS):
                target = e[1](ref)
                assert target is not None
                siblings.append(Cand(None, Picture(target, _jit(rng)), frozenset({target}), photo_kind))
            pool += [ref_cand, *cands, *siblings]
            for k, (text, _, _) in enumerate(chosen):
                negs = [ref_cand, *(c for j, c in enumerate(cands) if j != k), *siblings[:2], *traps[k][:1]]
                queries.append(Query(_cap(text), ref_pic, targets[k], "edit", {"edit": text}, negs))
                if (step + k) % 2 == 0:  # wrong modality: the target, described
                    pool.append(Cand(_sentence(describe(targets[k])), None, frozenset({targets[k]}), "caption"))
    return _finish(rng, queries, pool, n)


def cirr_composed(rng: random.Random, n: int, ctx: Context) -> SplitData:
    """CIRR task 7: scene + edit -> edited scene; the two references of a group share two shapes."""

    def refs() -> tuple[Scene, Scene]:
        first = random_scene(rng, (2, 3), distinct_shapes=True)
        shapes = [o.shape for o in rng.sample(list(first.objects), 2)]
        return first, _scene_with(rng, shapes)

    def trap(ref: Scene) -> Scene:
        return _scene_with(rng, [o.shape for o in ref.objects])

    return _composed(rng, n, refs, _scene_edits, trap, lambda s: caption(s, rng, "coco"), "photo")


def fashioniq_composed(rng: random.Random, n: int, ctx: Context) -> SplitData:
    """FashionIQ task 7: garment with trim + relative feedback -> the garment it describes."""

    def refs() -> tuple[Scene, Scene]:
        kind = rng.choice(GARMENTS)
        return random_garment(rng, accent=True, kind=kind), random_garment(rng, accent=True, kind=kind)

    def trap(ref: Scene) -> Scene:
        return random_garment(rng, accent=True, kind=_garment(ref).shape)

    return _composed(rng, n, refs, _garment_edits, trap, lambda s: _product_text(s, rng), "product_photo")


# ----------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class TaskSpec(DatasetTask):
    """One dataset-task of the corpus: the reader's :class:`DatasetTask` plus its generator and how many times
    the scale's training queries it gets (more only where the pool does not grow with them)."""

    generate: Generator
    train_multiple: int = 1


#: The 16 evaluated dataset-tasks, in the order papers report them.
TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("visualnews", 0, scene_t2i("news", 1)),
    TaskSpec("mscoco", 0, scene_t2i("coco", 2)),
    TaskSpec("fashion200k", 0, fashion_t2i),
    TaskSpec("webqa", 1, webqa_t2t),
    TaskSpec("edis", 2, edis_t2it),
    TaskSpec("webqa", 2, webqa_t2it),
    TaskSpec("visualnews", 3, scene_i2t("news", 1)),
    TaskSpec("mscoco", 3, scene_i2t("coco", 3)),
    TaskSpec("fashion200k", 3, fashion_i2t),
    TaskSpec("nights", 4, nights_i2i),
    TaskSpec("oven", 6, board_task(info=False, candidate="text"), train_multiple=BOARD_TRAIN_MULTIPLE),
    TaskSpec("infoseek", 6, board_task(info=True, candidate="text"), train_multiple=BOARD_TRAIN_MULTIPLE),
    TaskSpec("fashioniq", 7, fashioniq_composed),
    TaskSpec("cirr", 7, cirr_composed),
    TaskSpec("oven", 8, board_task(info=False, candidate="image,text"), train_multiple=BOARD_TRAIN_MULTIPLE),
    TaskSpec("infoseek", 8, board_task(info=True, candidate="image,text"), train_multiple=BOARD_TRAIN_MULTIPLE),
)


def iter_tasks() -> Iterator[TaskSpec]:
    """The dataset-tasks in report order."""
    return iter(TASKS)
