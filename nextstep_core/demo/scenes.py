"""Procedurally drawn scenes with exact captions, for training and measuring a tiny demo model.

A scene is a plain or two-tone background with one to three flat-coloured shapes, each inside
its own cell of a 3x3 grid. Everything is deterministic given a `numpy.random.Generator`, so a
seed always gives the same pixels, captions and edit instructions.

Vocabulary
----------
colours   red, green, blue, yellow, magenta, cyan, white, black (`COLORS`, RGB in `PALETTE`): near
          the corners of the RGB cube, so a blurred mix of two of them is never near a third
shapes    circle, square, triangle (apex up) (`SHAPES`); a diamond was left out because
          a blurred small diamond is hard to tell from a circle
sizes     small, large (`SIZES`): the object's side is 0.5 or 0.8 of the shorter cell side
positions top left, top, top right, left, center, right, bottom left, bottom, bottom right
          (`POSITIONS`, row-major over the 3x3 grid of equal thirds of the image)

Scene rules (the checker relies on them)
----------------------------------------
* Both image sides are at least 64 pixels (below that a blurred small square looks round).
* Every object lies inside its own grid cell, at least one pixel from the cell's edges, with
  its centre within 15% of the cell size from the cell's centre: objects never touch each other
  or the image border, and the position word is never borderline.
* No object has a background colour, and no two objects share both shape and colour, so
  "the red circle" always names one object.
* A two-tone background splits the image into equal halves, "top-bottom" (`background` above,
  `background2` below) or "left-right" (`background` left, `background2` right).

Caption grammar (`caption`; `checker.parse_caption` is its inverse)
--------------------------------------------------------------------
    caption    := objects [", on " background]
    objects    := object | object " and " object | object ", " object " and " object
    object     := article " " [size " "] colour " " shape " " place
    article    := "a" | "an"          ("an" before a vowel; no word of this vocabulary needs it)
    place      := "in the center" | "on the left" | "on the right" | "at the top"
                | "at the bottom" | "at the top left" | "at the top right"
                | "at the bottom left" | "at the bottom right"
    background := article " " colour " background"
                | "a background that is " colour " at the top and " colour " at the bottom"
                | "a background that is " colour " on the left and " colour " on the right"

Objects are listed in the scene's order. Example:
"a large red circle on the left and a small blue square at the bottom, on a white background".

Edit instruction grammar (`random_edit`)
----------------------------------------
    recolour   "make the " colour " " shape " " new-colour      "make the red circle green"
    move       "move the " colour " " shape " to the " position "move the blue square to the top left"
    add        "add " object                                    "add a small yellow triangle at the bottom right"
    remove     "remove the " colour " " shape                   "remove the red circle"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from ..errors import NextStepError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 185, 40), "blue": (30, 50, 220), "yellow": (235, 220, 30),
    "magenta": (215, 40, 215), "cyan": (30, 210, 220), "white": (240, 240, 240), "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.5, "large": 0.8}
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
PLACE_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
SPLITS: tuple[str, ...] = ("top-bottom", "left-right")
EDIT_KINDS: tuple[str, ...] = ("recolour", "move", "add", "remove")
MIN_SIDE = 64
MAX_OBJECTS = 3
CENTER_JITTER = 0.15
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((64, 64),)


@dataclass(frozen=True)
class SceneObject:
    """One flat-coloured shape; (x, y) is the centre of its bounding box in pixels."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise NextStepError(f"shape {self.shape!r} is not one of {SHAPES}")
        if self.color not in PALETTE:
            raise NextStepError(f"colour {self.color!r} is not one of {COLORS}")
        if self.size not in SIZES:
            raise NextStepError(f"size {self.size!r} is not one of {SIZES}")


@dataclass(frozen=True)
class Scene:
    """A background (two-tone when `background2` is set) and its objects."""

    width: int
    height: int
    background: str
    background2: str | None = None
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)
    split: str = "top-bottom"

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        check_size(self.width, self.height)
        for name in (self.background, self.background2):
            if name is not None and name not in PALETTE:
                raise NextStepError(f"background colour {name!r} is not one of {COLORS}")
        if self.split not in SPLITS:
            raise NextStepError(f"split {self.split!r} is not one of {SPLITS}")

    @property
    def background_colors(self) -> tuple[str, ...]:
        """The one or two background colour names."""
        return (self.background,) if self.background2 is None else (self.background, self.background2)


def check_size(width: int, height: int) -> None:
    """Reject image sizes too small for two objects in neighbouring cells to stay apart."""
    if width < MIN_SIDE or height < MIN_SIDE:
        raise NextStepError(f"scene size {width}x{height} is below the minimum side of {MIN_SIDE} pixels")


def object_extent(size: str, width: int, height: int) -> int:
    """Side of an object's bounding box in pixels for a size word and an image size."""
    return max(3, round(SIZE_FRACTIONS[size] * min(width, height) / 3))


def position_of(x: float, y: float, width: int, height: int) -> str:
    """The 3x3 grid word for a point."""
    col = min(2, max(0, int(x * 3 // width)))
    row = min(2, max(0, int(y * 3 // height)))
    return POSITIONS[row * 3 + col]


def _pick(rng: np.random.Generator, items):
    """One element of a sequence, chosen by rng, as a plain Python value."""
    return items[int(rng.integers(len(items)))]


def _axis_start(rng: np.random.Generator, index: int, length: int, extent: int) -> int:
    """A random first pixel along one axis for an object of `extent` pixels in cell `index`."""
    c0, c1 = index * length / 3, (index + 1) * length / 3
    lo, hi = math.ceil(c0) + 1, math.floor(c1) - 1 - extent
    if hi < lo:
        raise NextStepError(f"an object of {extent} pixels does not fit a cell of a {length}-pixel side")
    ideal = (c0 + c1) / 2 - extent / 2
    jitter = CENTER_JITTER * (c1 - c0)
    a, b = max(lo, math.ceil(ideal - jitter)), min(hi, math.floor(ideal + jitter))
    if b < a:
        a = b = min(hi, max(lo, round(ideal)))
    return int(rng.integers(a, b + 1))


def place_in_cell(rng: np.random.Generator, position: str, size: str, width: int, height: int) -> tuple[float, float]:
    """A random centre for an object of the given size in the named grid cell."""
    cell = POSITIONS.index(position)
    extent = object_extent(size, width, height)
    left = _axis_start(rng, cell % 3, width, extent)
    top = _axis_start(rng, cell // 3, height, extent)
    return left + extent / 2, top + extent / 2


def shape_test(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Which points at offsets (dx, dy) from a box centre lie in a shape whose box side is 2 * half.

    The triangle points up: its half-width grows linearly from the top edge to the base.
    """
    ax = np.abs(dx)
    inside = (ax < half) & (np.abs(dy) < half)
    eps = 1e-9
    if shape == "square":
        return inside
    if shape == "circle":
        return inside & (dx**2 + dy**2 <= half**2 + eps)
    if shape == "triangle":
        depth = (dy + half) / (2 * half)
        return inside & (ax <= depth * half + 0.25 + eps)
    raise NextStepError(f"shape {shape!r} is not one of {SHAPES}")


def shape_mask(obj: SceneObject, width: int, height: int) -> np.ndarray:
    """Boolean HxW mask of the pixels an object covers (pixel centres, no anti-aliasing)."""
    ys, xs = np.mgrid[0:height, 0:width]
    half = object_extent(obj.size, width, height) / 2
    return shape_test(obj.shape, xs + 0.5 - obj.x, ys + 0.5 - obj.y, half)


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a crisp RGB image."""
    pixels = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    pixels[:] = PALETTE[scene.background]
    if scene.background2 is not None:
        if scene.split == "top-bottom":
            pixels[scene.height // 2 :] = PALETTE[scene.background2]
        else:
            pixels[:, scene.width // 2 :] = PALETTE[scene.background2]
    for obj in scene.objects:
        pixels[shape_mask(obj, scene.width, scene.height)] = PALETTE[obj.color]
    return Image.fromarray(pixels, "RGB")


def article(word: str) -> str:
    """'an' before a vowel sound, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: SceneObject, width: int, height: int, with_size: bool = True) -> str:
    """'a large red circle on the left' for one object of a width x height scene."""
    words = f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"
    place = PLACE_PHRASES[position_of(obj.x, obj.y, width, height)]
    return f"{article(words)} {words} {place}"


def background_phrase(scene: Scene) -> str:
    """'a white background' or 'a background that is white at the top and black at the bottom'."""
    if scene.background2 is None:
        return f"{article(scene.background)} {scene.background} background"
    if scene.split == "top-bottom":
        return f"a background that is {scene.background} at the top and {scene.background2} at the bottom"
    return f"a background that is {scene.background} on the left and {scene.background2} on the right"


def join_phrases(phrases: list[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, *, sizes: bool = True, background: bool = True) -> str:
    """The scene's caption in the grammar of the module docstring."""
    if not scene.objects:
        raise NextStepError("a scene without objects has no caption")
    text = join_phrases([object_phrase(o, scene.width, scene.height, sizes) for o in scene.objects])
    return f"{text}, on {background_phrase(scene)}" if background else text


def object_colors(scene: Scene) -> list[str]:
    """Colours an object may take in this scene: every palette colour but the background's."""
    return [c for c in COLORS if c not in scene.background_colors]


def free_positions(scene: Scene) -> list[str]:
    """Grid cells that hold no object yet."""
    taken = {position_of(o.x, o.y, scene.width, scene.height) for o in scene.objects}
    return [p for p in POSITIONS if p not in taken]


def free_kinds(scene: Scene) -> list[tuple[str, str]]:
    """(shape, colour) pairs allowed in this scene and not used by any of its objects."""
    used = {(o.shape, o.color) for o in scene.objects}
    return [(s, c) for s in SHAPES for c in object_colors(scene) if (s, c) not in used]


def random_object(rng: np.random.Generator, scene: Scene) -> SceneObject:
    """A new object with an unused (shape, colour) in a free cell of the scene."""
    shape, color = _pick(rng, free_kinds(scene))
    size = _pick(rng, SIZES)
    x, y = place_in_cell(rng, _pick(rng, free_positions(scene)), size, scene.width, scene.height)
    return SceneObject(shape, color, size, x, y)


def random_background(rng: np.random.Generator, two_tone_probability: float = 0.35) -> tuple[str, str | None, str]:
    """(background, background2 or None, split) drawn from the palette."""
    first = _pick(rng, COLORS)
    if rng.random() >= two_tone_probability:
        return first, None, "top-bottom"
    second = _pick(rng, [c for c in COLORS if c != first])
    return first, second, _pick(rng, SPLITS)


def random_scene(rng: np.random.Generator, width: int = 64, height: int = 64, max_objects: int = MAX_OBJECTS) -> Scene:
    """A scene of 1..max_objects objects (at most 9) on a plain or two-tone background."""
    background, background2, split = random_background(rng)
    scene = Scene(width, height, background, background2, (), split)
    for _ in range(int(rng.integers(1, min(max_objects, 9) + 1))):
        scene = replace(scene, objects=scene.objects + (random_object(rng, scene),))
    return scene


def scene_dataset(seed: int, count: int, sizes=DEFAULT_SIZES) -> list[tuple[Image.Image, str]]:
    """`count` (image, caption) pairs; sample i has size sizes[i % len(sizes)] as (width, height)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        scene = random_scene(rng, width, height)
        samples.append((render(scene), caption(scene)))
    return samples


def find_object(scene: Scene, color: str, shape: str) -> SceneObject:
    """The scene's one object of this colour and shape."""
    for obj in scene.objects:
        if (obj.color, obj.shape) == (color, shape):
            return obj
    raise NextStepError(f"the scene has no {color} {shape}")


def _swap(scene: Scene, old: SceneObject, new: SceneObject | None) -> Scene:
    """The scene with `old` replaced by `new` (removed when new is None), order kept."""
    objects = []
    for obj in scene.objects:
        if obj != old:
            objects.append(obj)
        elif new is not None:
            objects.append(new)
    return replace(scene, objects=tuple(objects))


def _recolour(rng: np.random.Generator, scene: Scene) -> tuple[str, Scene] | None:
    """Change one object's colour to an allowed, unused colour for its shape."""
    free = set(free_kinds(scene))
    options = [(o, c) for o in scene.objects for c in object_colors(scene) if (o.shape, c) in free]
    if not options:
        return None
    obj, color = _pick(rng, options)
    return f"make the {obj.color} {obj.shape} {color}", _swap(scene, obj, replace(obj, color=color))


def _move(rng: np.random.Generator, scene: Scene) -> tuple[str, Scene] | None:
    """Move one object to an empty cell."""
    cells = free_positions(scene)
    if not cells:
        return None
    obj, cell = _pick(rng, scene.objects), _pick(rng, cells)
    x, y = place_in_cell(rng, cell, obj.size, scene.width, scene.height)
    return f"move the {obj.color} {obj.shape} to the {cell}", _swap(scene, obj, replace(obj, x=x, y=y))


def _add(rng: np.random.Generator, scene: Scene) -> tuple[str, Scene] | None:
    """Add a new object, keeping at most MAX_OBJECTS."""
    if len(scene.objects) >= MAX_OBJECTS or not free_kinds(scene):
        return None
    obj = random_object(rng, scene)
    return f"add {object_phrase(obj, scene.width, scene.height)}", replace(scene, objects=scene.objects + (obj,))


def _remove(rng: np.random.Generator, scene: Scene) -> tuple[str, Scene] | None:
    """Remove one object, keeping at least one."""
    if len(scene.objects) < 2:
        return None
    obj = _pick(rng, scene.objects)
    return f"remove the {obj.color} {obj.shape}", _swap(scene, obj, None)


_EDITS = {"recolour": _recolour, "move": _move, "add": _add, "remove": _remove}


def random_edit(rng: np.random.Generator, scene: Scene, kind: str | None = None,
                weights: dict[str, float] | None = None) -> tuple[Scene, str, Scene]:
    """(source, instruction, target): one edit of `kind`, or of a random kind that fits the scene,
    the kinds tried in an order drawn uniformly or, with `weights` (kind -> relative weight, 1 for
    a kind not named), in proportion to them."""
    if kind is not None and kind not in _EDITS:
        raise NextStepError(f"edit kind {kind!r} is not one of {EDIT_KINDS}")
    kinds = [kind] if kind is not None else list(EDIT_KINDS)
    while kinds:
        if weights is None:
            chosen = kinds.pop(int(rng.integers(len(kinds))))
        else:
            odds = np.array([weights.get(k, 1.0) for k in kinds], dtype=np.float64)
            chosen = kinds.pop(int(rng.choice(len(kinds), p=odds / odds.sum())))
        result = _EDITS[chosen](rng, scene)
        if result is not None:
            return scene, result[0], result[1]
    raise NextStepError(f"no {kind or 'edit'} fits this scene")


def edit_dataset(seed: int, count: int, sizes=DEFAULT_SIZES,
                 weights: dict[str, float] | None = None) -> list[tuple[Image.Image, str, Image.Image]]:
    """`count` (source image, instruction, target image) triples, sizes cycled as in scene_dataset,
    the edit kinds drawn with `weights` (random_edit)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        source, instruction, target = random_edit(rng, random_scene(rng, width, height), weights=weights)
        samples.append((render(source), instruction, render(target)))
    return samples
