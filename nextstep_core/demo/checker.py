"""Analytic prompt-following checker for the scenes of `nextstep_core.demo.scenes` (numpy only).

`parse_caption` reads the caption grammar documented in `scenes`; `find_objects` segments an
image into flat-coloured shapes; `score` matches the two:

1. Every pixel takes the nearest palette colour, or none when it is farther than
   `COLOR_TOLERANCE` (RGB distance) from all of them.
2. Background colours are the palette colours covering at least 10% of a 2-pixel border ring,
   so a two-tone background is found as well as a plain one (objects never touch the border).
3. The remaining pixels form 8-connected components per colour. A component is kept when it
   is big enough and has enough "core" pixels (all 8 neighbours share its colour), which
   drops the thin fringes that blur leaves between two colours.
4. Shape by template fit: the ideal circle, square and triangle with the component's area
   (box fill 0.785, 1.0 and 0.5), placed on its centroid at a few scales, are compared with it
   by intersection over union; the best fit wins (below MIN_TEMPLATE_IOU: "unknown").
   Position is the 3x3 cell of the bounding-box centre; size compares the box side with the
   shorter cell side (threshold halfway between the small and large fractions).

The parser also accepts captions without sizes or without a background phrase, "a", "an" or
"one", "centre"/"middle" for center, and a final full stop.

score = (matched objects + background matched) / (max(captioned, found) + 1 if the caption
names a background, else max(captioned, found)), with a one-to-one matching on shape, colour,
position and (when captioned) size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import NextStepError
from .scenes import COLORS, PALETTE, PLACE_PHRASES, SHAPES, SIZE_FRACTIONS, SIZES, position_of, shape_test

COLOR_TOLERANCE = 90.0
BORDER = 2
BACKGROUND_SHARE = 0.1
MIN_AREA_FRACTION = 0.25  # of a small object's box area
MIN_CORE_PIXELS = 3
SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
TEMPLATE_SCALES = (0.94, 1.0, 1.06)
MIN_TEMPLATE_IOU = 0.6
MAX_ASPECT = 1.6


@dataclass(frozen=True)
class ObjectSpec:
    """One captioned object; size (and, in a free phrasing, position) is None when the caption
    does not say."""

    shape: str
    color: str
    position: str | None
    size: str | None = None


@dataclass(frozen=True)
class BackgroundSpec:
    """A plain (color2 None) or two-tone background; split is 'top-bottom' or 'left-right'."""

    color: str
    color2: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Found:
    """A shape found in an image; bbox is (x0, y0, x1, y1) with x1, y1 exclusive."""

    shape: str
    color: str
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    position: str
    size: str


# ---------------------------------------------------------------- caption parsing

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_PLACE_ALIASES = {
    **{phrase: word for word, phrase in PLACE_PHRASES.items()},
    "at the center": "center",
    "in the centre": "center",
    "at the centre": "center",
    "in the middle": "center",
    "at the left": "left",
    "at the right": "right",
    "on the top": "top",
    "on the bottom": "bottom",
}
_PLACE = "|".join(sorted((re.escape(p) for p in _PLACE_ALIASES), key=len, reverse=True))
_OBJECT_RE = re.compile(
    rf"^(?:a|an|one) (?:(?P<size>{'|'.join(SIZES)}) )?(?P<color>{_COLOR}) (?P<shape>{_SHAPE}) (?P<place>{_PLACE})$"
)
_PLAIN_BG_RE = re.compile(rf"^(?:a|an) (?P<c1>{_COLOR}) background$")
_SPLIT_BG_RE = re.compile(
    rf"^a background that is (?P<c1>{_COLOR}) (?P<w1>at the top|on the left) and "
    rf"(?P<c2>{_COLOR}) (?P<w2>at the bottom|on the right)$"
)


def _normalise(text: str) -> str:
    """Lower case, single spaces, no final full stop."""
    return " ".join(text.lower().replace(" ,", ",").split()).rstrip(".").strip()


def _split_caption(text: str) -> tuple[str, str | None]:
    """(objects part, background part or None)."""
    text = _normalise(text)
    match = re.search(r",? on (an? (?:\w+ background|background that is .*))$", text)
    if match is None:
        return text, None
    return text[: match.start()], match.group(1)


def parse_background(text: str) -> BackgroundSpec | None:
    """The background a caption names, or None when it names none."""
    part = _split_caption(text)[1]
    if part is None:
        return None
    if plain := _PLAIN_BG_RE.match(part):
        return BackgroundSpec(plain["c1"])
    if split := _SPLIT_BG_RE.match(part):
        orientation = "top-bottom" if split["w1"] == "at the top" else "left-right"
        if (orientation == "top-bottom") != (split["w2"] == "at the bottom"):
            raise NextStepError(f"background phrase {part!r} mixes top/bottom with left/right")
        return BackgroundSpec(split["c1"], split["c2"], orientation)
    raise NextStepError(f"cannot read the background phrase {part!r}")


def parse_caption(text: str) -> list[ObjectSpec]:
    """The objects of a caption, in order (the inverse of `scenes.caption`)."""
    objects_part = _split_caption(text)[0]
    pieces = [p.strip() for p in re.split(r",| and ", objects_part) if p.strip()]
    if not pieces:
        raise NextStepError(f"caption {text!r} names no object")
    specs = []
    for piece in pieces:
        match = _OBJECT_RE.match(piece)
        if match is None:
            raise NextStepError(f"cannot read {piece!r} in caption {text!r}")
        place = _PLACE_ALIASES[match["place"]]
        specs.append(ObjectSpec(match["shape"], match["color"], place, match["size"]))
    return specs


# ---------------------------------------------------------------- segmentation

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def as_pixels(image) -> np.ndarray:
    """HxWx3 uint8 array from a PIL image or an array (grey and RGBA accepted)."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise NextStepError(f"expected an HxWx3 image, got shape {pixels.shape}")
    return pixels[..., :3].astype(np.uint8, copy=False)


def palette_labels(pixels: np.ndarray, tolerance: float = COLOR_TOLERANCE) -> np.ndarray:
    """HxW index into COLORS of each pixel's nearest palette colour, -1 when none is near."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    squared = (flat**2).sum(1, keepdims=True) - 2 * flat @ _PALETTE_RGB.T + (_PALETTE_RGB**2).sum(1)
    labels = squared.argmin(1)
    labels[squared.min(1) > tolerance**2] = -1
    return labels.reshape(pixels.shape[:2])


def _border(labels: np.ndarray) -> np.ndarray:
    """The labels of the BORDER-pixel ring, flattened."""
    inner = np.zeros(labels.shape, dtype=bool)
    inner[BORDER:-BORDER, BORDER:-BORDER] = True
    return labels[~inner]


def _majority(labels: np.ndarray) -> tuple[int, float]:
    """(most common label ignoring -1, the share of all pixels it covers), or (-1, 0.0)."""
    known = labels[labels >= 0]
    if not known.size:
        return -1, 0.0
    counts = np.bincount(known)
    return int(counts.argmax()), float(counts.max() / labels.size)


def background_labels(labels: np.ndarray) -> list[int]:
    """Palette indices covering at least BACKGROUND_SHARE of the border ring."""
    border = _border(labels)
    counts = np.bincount(border[border >= 0], minlength=len(COLORS))
    return [i for i in range(len(COLORS)) if counts[i] >= BACKGROUND_SHARE * border.size]


def find_background(image) -> BackgroundSpec | None:
    """The image's plain or two-tone background read from its border (None: no palette colour)."""
    return background_of(palette_labels(as_pixels(image)))


def background_of(labels: np.ndarray) -> BackgroundSpec | None:
    """The background of a palette label map.

    A two-tone split is the orientation whose two opposite edges are each the most uniform.
    """
    found = background_labels(labels)
    if not found:
        return None
    if len(found) >= 2:
        (top, top_share), (bottom, bottom_share) = _majority(labels[:BORDER]), _majority(labels[-BORDER:])
        (left, left_share), (right, right_share) = _majority(labels[:, :BORDER]), _majority(labels[:, -BORDER:])
        if min(top_share, bottom_share) >= min(left_share, right_share):
            first, second, split = top, bottom, "top-bottom"
        else:
            first, second, split = left, right, "left-right"
        if first != second and first in found and second in found:
            return BackgroundSpec(COLORS[first], COLORS[second], split)
    return BackgroundSpec(COLORS[_majority(_border(labels))[0]])


def _shifted(array: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """array moved so that out[y, x] = array[y + dy, x + dx], `fill` outside."""
    out = np.full_like(array, fill)
    h, w = array.shape
    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = array[
        max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
    ]
    return out


def core_mask(labels: np.ndarray) -> np.ndarray:
    """Pixels with a label whose 8 neighbours all carry the same label."""
    core = labels >= 0
    for dy, dx in _NEIGHBOURS:
        core &= _shifted(labels, dy, dx, -2) == labels
    return core


def connected_components(labels: np.ndarray) -> np.ndarray:
    """HxW component ids (-1 for label -1): 8-connected pixels of equal label share an id.

    Min-id propagation over the 8 neighbours with pointer jumping, until nothing changes.
    """
    h, w = labels.shape
    sentinel = h * w
    ids = np.where(labels >= 0, np.arange(h * w).reshape(h, w), sentinel)
    same = [(dy, dx, _shifted(labels, dy, dx, -2) == labels) for dy, dx in _NEIGHBOURS]
    while True:
        new = ids.copy()
        for dy, dx, link in same:
            np.minimum(new, np.where(link, _shifted(ids, dy, dx, sentinel), sentinel), out=new)
        flat = np.append(new.ravel(), sentinel)
        new = flat[new]  # pointer jumping: take the id of the pixel our id points at
        if np.array_equal(new, ids):
            break
        ids = new
    return np.where(ids == sentinel, -1, ids)


def _template_iou(mask: np.ndarray, shape: str, half: float) -> float:
    """IoU of a component with the ideal shape of box side 2 * half placed on its centroid."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    if shape == "triangle":
        cy -= half / 3  # the centroid lies a sixth of the side below the box centre
    pad = int(np.ceil(half)) + 2
    h, w = mask.shape
    grid_y, grid_x = np.mgrid[-pad : h + pad, -pad : w + pad]
    template = shape_test(shape, grid_x + 0.5 - cx, grid_y + 0.5 - cy, half)
    padded = np.pad(mask, pad)
    return (template & padded).sum() / (template | padded).sum()


def classify_shape(mask: np.ndarray) -> str:
    """Shape name of a component cropped to its bounding box (or 'unknown').

    Each shape's ideal template, sized to the component's area (a few scales around it) and
    placed on its centroid, is compared by intersection over union; the best fit wins when it
    is good enough. This uses the whole outline, so a blurred corner or tip matters little.
    """
    h, w = mask.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "unknown"
    area = mask.sum()
    fits = {}
    for shape in SHAPES:
        half = np.sqrt(area / SHAPE_FILL[shape]) / 2
        fits[shape] = max(_template_iou(mask, shape, half * scale) for scale in TEMPLATE_SCALES)
    best = max(fits, key=fits.get)
    return best if fits[best] >= MIN_TEMPLATE_IOU else "unknown"


def classify_size(extent: float, width: int, height: int) -> str:
    """'small' or 'large' by the box side relative to the shorter cell side."""
    threshold = (SIZE_FRACTIONS["small"] + SIZE_FRACTIONS["large"]) / 2
    return "small" if extent < threshold * min(width, height) / 3 else "large"


def find_objects(image) -> list[Found]:
    """Flat-coloured shapes of the image, background removed, largest first."""
    return objects_of(palette_labels(as_pixels(image)))


def objects_of(labels: np.ndarray) -> list[Found]:
    """The shapes of a palette label map (see find_objects)."""
    height, width = labels.shape
    labels = np.where(np.isin(labels, background_labels(labels)), -1, labels)
    ids = connected_components(labels)
    core = core_mask(labels)
    small_side = SIZE_FRACTIONS["small"] * min(width, height) / 3
    min_area = max(4, MIN_AREA_FRACTION * small_side**2)
    found = []
    ys, xs = np.nonzero(ids >= 0)
    comp = ids[ys, xs]
    for cid in np.unique(comp):
        sel = comp == cid
        cy, cx = ys[sel], xs[sel]
        if cy.size < min_area or core[cy, cx].sum() < MIN_CORE_PIXELS:
            continue
        x0, y0, x1, y1 = int(cx.min()), int(cy.min()), int(cx.max()) + 1, int(cy.max()) + 1
        crop = ids[y0:y1, x0:x1] == cid
        center = ((x0 + x1) / 2, (y0 + y1) / 2)
        found.append(
            Found(
                shape=classify_shape(crop),
                color=COLORS[labels[cy[0], cx[0]]],
                center=center,
                bbox=(x0, y0, x1, y1),
                area=int(cy.size),
                position=position_of(center[0], center[1], width, height),
                size=classify_size(max(x1 - x0, y1 - y0), width, height),
            )
        )
    return sorted(found, key=lambda f: -f.area)


# ---------------------------------------------------------------- scoring


def _matches(spec: ObjectSpec, found: Found) -> bool:
    """Same shape and colour, and the same position and size where the caption names them."""
    return ((spec.shape, spec.color) == (found.shape, found.color)
            and spec.position in (None, found.position) and spec.size in (None, found.size))


def match_count(specs: list[ObjectSpec], found: list[Found]) -> int:
    """Size of a maximum one-to-one matching between captioned and found objects."""
    owner: dict[int, int] = {}  # found index -> spec index

    def claim(i: int, seen: set[int]) -> bool:
        for j, candidate in enumerate(found):
            if j in seen or not _matches(specs[i], candidate):
                continue
            seen.add(j)
            if j not in owner or claim(owner[j], seen):
                owner[j] = i
                return True
        return False

    return sum(claim(i, set()) for i in range(len(specs)))


def score(image, caption: str, *, background: bool = True) -> float:
    """Fraction in [0, 1] of the caption honoured by the image (see the module docstring).

    With background=False, or a caption without a background phrase, only objects count.
    """
    return score_specs(image, parse_caption(caption), parse_background(caption) if background else None)


def score_specs(image, specs: list[ObjectSpec], wanted: BackgroundSpec | None) -> float:
    """`score` for objects and a background given directly (a free phrasing's request, say: an
    object's position or size None when the caption leaves it free; no background: any)."""
    labels = palette_labels(as_pixels(image))
    found = objects_of(labels)
    matched = match_count(specs, found)
    total = max(len(specs), len(found))
    if wanted is not None:
        matched += int(background_of(labels) == wanted)
        total += 1
    return matched / total


def score_edit(image, target_caption: str, *, background: bool = True) -> float:
    """How well an edited image matches the caption of the edit's target scene."""
    return score(image, target_caption, background=background)
