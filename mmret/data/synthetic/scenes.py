"""The object/scene model of the synthetic corpus: attributes, scenes, their rendering and their descriptions.

A :class:`Scene` is a grid of cells, at most one :class:`Obj` per cell, on a named background. An object has a
shape (a geometric shape or a garment), a colour, a texture, a size (a length for garments) and optionally an
accent (trim) colour. Scenes
are frozen and hashable: a scene *is* its own semantic key, so two renderings of the same scene (different
``jitter``) depict the same thing and texts generated from it describe exactly it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from PIL import Image, ImageChops, ImageDraw

Cell = tuple[int, int]  # (row, column)

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
GARMENTS = ("dress", "shirt", "trousers", "skirt", "coat")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 210),
    "yellow": (240, 215, 40),
    "purple": (135, 50, 175),
    "orange": (245, 135, 20),
    "white": (248, 248, 248),
    "pink": (245, 140, 190),
}
#: Garments also come in black and brown.
FASHION_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, "black": (20, 20, 20), "brown": (115, 70, 30)}
TEXTURES = ("plain", "striped", "dotted", "checked")
SIZES = ("small", "large")
#: A garment's ``size`` is its length.
LENGTHS = ("short", "medium", "long")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (140, 140, 140),
    "sand": (205, 185, 145),
    "charcoal": (50, 50, 56),
    "studio": (212, 212, 218),  # garments only
}
SCENE_BACKGROUNDS = ("grey", "sand", "charcoal")
_LIGHT = {"yellow", "white", "pink", "orange"}

# Words used in texts; several synonyms each, so descriptions vary without changing meaning.
_TEXTURE_WORDS = {
    "plain": ("plain", "solid"),
    "striped": ("striped",),
    "dotted": ("dotted", "spotted"),
    "checked": ("checked", "checkered"),
}
_SIZE_WORDS = {
    "small": ("small", "little"),
    "large": ("large", "big"),
    "short": ("short", "cropped"),
    "medium": ("mid-length", "medium-length"),
    "long": ("long", "full-length"),
}
_CELL_WORDS_3X3: dict[Cell, tuple[str, ...]] = {
    (0, 0): ("at the top left", "in the upper left corner"),
    (0, 1): ("at the top", "at the top centre"),
    (0, 2): ("at the top right", "in the upper right corner"),
    (1, 0): ("on the left", "at the middle left"),
    (1, 1): ("in the centre", "in the middle"),
    (1, 2): ("on the right", "at the middle right"),
    (2, 0): ("at the bottom left", "in the lower left corner"),
    (2, 1): ("at the bottom", "at the bottom centre"),
    (2, 2): ("at the bottom right", "in the lower right corner"),
}
ORDINALS = ("first", "second", "third", "fourth", "fifth")


@dataclass(frozen=True, order=True)
class Obj:
    """One object: what it is (shape, colour, texture, accent), how big and where (grid cell)."""

    shape: str
    colour: str
    texture: str = "plain"
    size: str = "large"
    cell: Cell = (0, 0)
    accent: str | None = None  # trim colour of a garment

    @property
    def look(self) -> tuple[str, str, str]:
        """The identity of the object regardless of size and place (shape, colour, texture)."""
        return (self.shape, self.colour, self.texture)


@dataclass(frozen=True)
class Scene:
    """Objects on a ``grid`` (rows, columns) of a ``width`` x ``height`` image; objects sorted by cell."""

    objects: tuple[Obj, ...]
    background: str = "grey"
    grid: tuple[int, int] = (3, 3)
    width: int = 84
    height: int = 84

    def at(self, cell: Cell) -> Obj | None:
        """The object in ``cell``, if any."""
        for obj in self.objects:
            if obj.cell == cell:
                return obj
        return None

    def free_cells(self) -> list[Cell]:
        """Empty cells, in row-major order."""
        used = {o.cell for o in self.objects}
        return [(r, c) for r in range(self.grid[0]) for c in range(self.grid[1]) if (r, c) not in used]

    def with_objects(self, objects: Sequence[Obj]) -> Scene:
        """The same canvas with other objects (kept sorted by cell)."""
        return replace(self, objects=tuple(sorted(objects, key=lambda o: o.cell)))


def make_scene(
    objects: Sequence[Obj], background: str = "grey", grid: tuple[int, int] = (3, 3), width: int = 84, height: int = 84
) -> Scene:
    """A scene with its objects in canonical (cell) order, so equal content gives equal scenes."""
    cells = [o.cell for o in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell: {cells}")
    return Scene(tuple(sorted(objects, key=lambda o: o.cell)), background, grid, width, height)


def random_object(rng: random.Random, cell: Cell, shapes: Sequence[str] = SHAPES) -> Obj:
    """An object with uniformly drawn shape, colour, texture and size in ``cell``."""
    return Obj(rng.choice(shapes), rng.choice(list(COLOURS)), rng.choice(TEXTURES), rng.choice(SIZES), cell)


def random_scene(
    rng: random.Random,
    n_objects: tuple[int, int] = (1, 3),
    *,
    distinct_shapes: bool = False,
    grid: tuple[int, int] = (3, 3),
    width: int = 84,
    height: int = 84,
) -> Scene:
    """A scene with ``n_objects`` (inclusive range) random objects in distinct random cells."""
    n = rng.randint(*n_objects)
    cells = rng.sample([(r, c) for r in range(grid[0]) for c in range(grid[1])], n)
    shapes = rng.sample(SHAPES, n) if distinct_shapes else [rng.choice(SHAPES) for _ in range(n)]
    objs = [replace(random_object(rng, cell), shape=s) for cell, s in zip(cells, shapes, strict=True)]
    return make_scene(objs, rng.choice(SCENE_BACKGROUNDS), grid, width, height)


def perturb(scene: Scene, rng: random.Random) -> Scene:
    """The scene with exactly one thing changed (an attribute or the cell of one object, or the background)."""
    while True:
        what = rng.choice(("colour", "shape", "texture", "size", "cell", "colour", "shape", "background"))
        if what == "background":
            options = [b for b in SCENE_BACKGROUNDS if b != scene.background]
            return replace(scene, background=rng.choice(options))
        obj = rng.choice(scene.objects)
        rest = [o for o in scene.objects if o is not obj]
        if what == "cell":
            free = scene.free_cells()
            if not free:
                continue
            new = replace(obj, cell=rng.choice(free))
        else:
            pool = {"colour": list(COLOURS), "shape": list(SHAPES), "texture": TEXTURES, "size": SIZES}[what]
            new = replace(obj, **{what: rng.choice([v for v in pool if v != getattr(obj, what)])})
        return scene.with_objects([*rest, new])


# ----------------------------------------------------------------------------------------------- rendering


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        rad = 0.5 if k % 2 == 0 else 0.5 * inner
        ang = -math.pi / 2 + k * math.pi / points
        out.append((0.5 + rad * math.cos(ang), 0.53 + rad * math.sin(ang)))
    return out


# Outlines in unit coordinates of the object's box.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(0.08, 0.08), (0.92, 0.08), (0.92, 0.92), (0.08, 0.92)],
    "triangle": [(0.5, 0.04), (0.97, 0.93), (0.03, 0.93)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "star": _star(),
    "cross": [
        (0.35, 0.02),
        (0.65, 0.02),
        (0.65, 0.35),
        (0.98, 0.35),
        (0.98, 0.65),
        (0.65, 0.65),
        (0.65, 0.98),
        (0.35, 0.98),
        (0.35, 0.65),
        (0.02, 0.65),
        (0.02, 0.35),
        (0.35, 0.35),
    ],
    "dress": [(0.36, 0.02), (0.64, 0.02), (0.66, 0.36), (0.96, 0.98), (0.04, 0.98), (0.34, 0.36)],
    "shirt": [
        (0.3, 0.04),
        (0.7, 0.04),
        (1.0, 0.26),
        (0.88, 0.44),
        (0.78, 0.36),
        (0.78, 0.96),
        (0.22, 0.96),
        (0.22, 0.36),
        (0.12, 0.44),
        (0.0, 0.26),
    ],
    "trousers": [(0.18, 0.02), (0.82, 0.02), (0.92, 0.98), (0.6, 0.98), (0.5, 0.34), (0.4, 0.98), (0.08, 0.98)],
    "skirt": [(0.28, 0.1), (0.72, 0.1), (0.98, 0.9), (0.02, 0.9)],
    "coat": [
        (0.3, 0.02),
        (0.7, 0.02),
        (0.98, 0.2),
        (0.98, 0.8),
        (0.84, 0.8),
        (0.8, 0.3),
        (0.8, 0.99),
        (0.2, 0.99),
        (0.2, 0.3),
        (0.16, 0.8),
        (0.02, 0.8),
        (0.02, 0.2),
    ],
}
#: Fraction of the box height taken by a garment's trim band (collar or waistband).
_TRIM = 0.16
_SIZE_FRACTION = {"small": 0.52, "large": 0.9}
_LENGTH_FRACTION = {"short": 0.56, "medium": 0.74, "long": 0.94}


def _mask(shape: str, w: int, h: int) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
    else:
        draw.polygon([(x * (w - 1), y * (h - 1)) for x, y in _OUTLINES[shape]], fill=255)
    return mask


def _fill(w: int, h: int, rgb: tuple[int, int, int], texture: str, ink: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (w, h), rgb)
    if texture == "plain":
        return img
    draw = ImageDraw.Draw(img)
    step = max(4, min(w, h) // 4)
    if texture == "striped":
        for y in range(step // 2, h, step):
            draw.rectangle((0, y, w, y + max(1, step // 4) - 1), fill=ink)
    elif texture == "dotted":
        r = max(1, step // 4)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
    elif texture == "checked":  # a grid of thin lines (gingham): the base colour stays the majority
        line = max(1, step // 4)
        for y in range(step // 2, h, step):
            draw.rectangle((0, y, w, y + line - 1), fill=ink)
        for x in range(step // 2, w, step):
            draw.rectangle((x, 0, x + line - 1, h), fill=ink)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return img


def _shade(rgb: tuple[int, int, int], rng: random.Random | None, amount: int) -> tuple[int, int, int]:
    """A lighter or darker shade (one offset for all channels, so the hue and the colour name stay)."""
    if rng is None:
        return rgb
    delta = rng.randint(-amount, amount)
    r, g, b = (min(255, max(0, v + delta)) for v in rgb)
    return (r, g, b)


def render(scene: Scene, jitter: int | None = None) -> Image.Image:
    """Draw ``scene``; ``jitter`` (a seed) perturbs placement, scale and shades, keeping the content.

    Objects stay inside their cell, so a jittered rendering still depicts exactly the same scene.
    """
    rng = random.Random(jitter) if jitter is not None else None
    img = Image.new("RGB", (scene.width, scene.height), _shade(BACKGROUNDS[scene.background], rng, 10))
    rows, cols = scene.grid
    cw, ch = scene.width / cols, scene.height / rows
    palette = FASHION_COLOURS
    for obj in scene.objects:
        scale = rng.uniform(0.92, 1.04) if rng is not None else 1.0
        if obj.shape in GARMENTS:  # hangs from the top of its cell; the length sets the height
            w = min(int(cw), max(6, round(cw * 0.84 * scale)))
            h = min(int(ch * 0.96), max(6, round(ch * _LENGTH_FRACTION[obj.size] * scale)))
            slack_x, slack_y = (cw - w) / 2, ch * 0.02
        else:
            w = h = min(int(cw), int(ch), max(6, round(min(cw, ch) * _SIZE_FRACTION[obj.size] * scale)))
            slack_x, slack_y = (cw - w) / 2, (ch - h) / 2
        dx = rng.uniform(-slack_x, slack_x) * 0.8 if rng is not None else 0.0
        dy = rng.uniform(-slack_y, slack_y) * 0.8 if rng is not None else 0.0
        x0 = int(obj.cell[1] * cw + slack_x + dx)
        y0 = int(obj.cell[0] * ch + slack_y + dy)
        rgb = _shade(palette[obj.colour], rng, 14)
        ink = (25, 25, 25) if obj.colour in _LIGHT else (240, 240, 240)
        mask = _mask(obj.shape, w, h)
        img.paste(_fill(w, h, rgb, obj.texture, ink), (x0, y0), mask)
        if obj.accent is not None:
            band = Image.new("L", (w, h), 0)
            ImageDraw.Draw(band).rectangle((0, 0, w, max(2, int(h * _TRIM))), fill=255)
            img.paste(
                Image.new("RGB", (w, h), _shade(palette[obj.accent], rng, 14)),
                (x0, y0),
                ImageChops.multiply(mask, band),
            )
    return img


# ----------------------------------------------------------------------------------------------- words


def article(phrase: str) -> str:
    """``phrase`` with "a" or "an" in front."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def look_phrase(obj: Obj, rng: random.Random, *, size: bool = False) -> str:
    """Colour, texture and shape (and size when asked), e.g. "large red striped circle"."""
    words = [rng.choice(_SIZE_WORDS[obj.size])] if size else []
    words += [obj.colour, rng.choice(_TEXTURE_WORDS[obj.texture]), obj.shape]
    return " ".join(words)


def attribute_word(attr: str, value: str, rng: random.Random) -> str:
    """One word for an object's ``attr`` ("shape", "colour", "texture" or "size") being ``value``."""
    if attr == "texture":
        return rng.choice(_TEXTURE_WORDS[value])
    if attr == "size":
        return rng.choice(_SIZE_WORDS[value])
    return value


def garment_phrase(obj: Obj, rng: random.Random) -> str:
    """A garment, e.g. "long blue dotted dress with red trim"."""
    text = f"{rng.choice(_SIZE_WORDS[obj.size])} {obj.colour} {rng.choice(_TEXTURE_WORDS[obj.texture])} {obj.shape}"
    if obj.accent is not None:
        text += rng.choice((f" with {obj.accent} trim", f" with a {obj.accent} trim"))
    return text


def cell_phrase(cell: Cell, grid: tuple[int, int], rng: random.Random) -> str:
    """Where ``cell`` is: named places on a 3x3 grid, row and column numbers otherwise."""
    if grid == (3, 3):
        return rng.choice(_CELL_WORDS_3X3[cell])
    r, c = cell
    return rng.choice(
        (
            f"in row {r + 1}, column {c + 1}",
            f"at row {r + 1}, column {c + 1}",
            f"in the {ORDINALS[r]} row and {ORDINALS[c]} column",
        )
    )


def scene_phrase(scene: Scene, rng: random.Random, *, background: bool = True) -> str:
    """Every object with its size, look and place, then (optionally) the background; objects in random order."""
    parts = [
        f"{article(look_phrase(o, rng, size=True))} {cell_phrase(o.cell, scene.grid, rng)}"
        for o in rng.sample(list(scene.objects), len(scene.objects))
    ]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if background:
        text += rng.choice((f" on a {scene.background} background", f" against a {scene.background} backdrop"))
    return text
