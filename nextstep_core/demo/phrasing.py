"""Free phrasings of scene captions: what people type instead of the caption grammar.

`scenes.caption` writes one grammar ("a large red circle on the left, on a white background").
People leave out what they do not care about and say the rest their own way, so the demo model
is trained on, and measured with, captions that vary the grammar (`Phrasing`):

    sizes         kept, left out, or said with a synonym ("big", "tiny", "little")
    background    last (as the grammar), first ("on a white background, a red circle"), or left out
    positions     kept, left out, or said another way ("in the middle", "on the left side",
                  "in the upper left", "at the bottom right corner")
    telegraphic   "red circle, left; blue square, top right; white background"
    plural        two objects of one colour share it: "a circle on the left and a square at the
                  top, both red"
    article       the leading "a"/"an" of each object left out
    casing        sentence case and a full stop ("A red circle on the left.")

What a caption leaves out is the model's free choice, and the training data says so: one phrasing
fits every scene that differs only in what it leaves out. `phrase` returns the caption with what
it still asks for (`Request`), which `checker.score_request` scores: an object whose position is
not named may be anywhere, a size not named may be either, a background not named any colour.

One convention makes a caption without positions easier to follow: in training, such a caption
names its objects in reading order (`free_caption`, `in_reading_order`), so "a red circle and a
blue square" is drawn with the red circle first, above or to the left of the blue square.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from ..errors import NextStepError
from .checker import BackgroundSpec, ObjectSpec, parse_background, parse_caption
from .scenes import PLACE_PHRASES, POSITIONS, Scene, article, position_of

SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
PLACE_SYNONYMS = {
    "top left": ("in the upper left", "at the top left corner"),
    "top": ("at the top", "on the top"),
    "top right": ("in the upper right", "at the top right corner"),
    "left": ("on the left side", "at the left"),
    "center": ("in the middle", "in the centre", "at the center"),
    "right": ("on the right side", "at the right"),
    "bottom left": ("in the lower left", "at the bottom left corner"),
    "bottom": ("at the bottom", "on the bottom"),
    "bottom right": ("in the lower right", "at the bottom right corner"),
}
TELEGRAPHIC_PLACES = {**{p: (p,) for p in PLACE_PHRASES}, "center": ("center", "middle", "centre")}
# The held-out evaluation's forms: each changes one thing of the grammar ("exact": nothing);
# "mixed" draws every choice at random, as training does.
FORMS = ("exact", "no_size", "size_synonyms", "no_background", "background_first", "no_position",
         "position_synonyms", "telegraphic", "plural", "no_article", "casing", "mixed")


@dataclass(frozen=True)
class Phrasing:
    """How to say a scene: sizes/positions 'word', 'synonym' or 'none'; background 'last', 'first'
    or 'none'. The default is the caption grammar."""

    sizes: str = "word"
    positions: str = "word"
    background: str = "last"
    telegraphic: bool = False
    plural: bool = False
    article: bool = True
    casing: bool = False


@dataclass(frozen=True)
class Request:
    """What a caption asks for: objects (position/size None where left free) and the background."""

    objects: tuple[ObjectSpec, ...]
    background: BackgroundSpec | None


def form_phrasing(form: str) -> Phrasing:
    """The Phrasing of one of FORMS other than 'mixed'."""
    changes = {"exact": {}, "no_size": {"sizes": "none"}, "size_synonyms": {"sizes": "synonym"},
               "no_background": {"background": "none"}, "background_first": {"background": "first"},
               "no_position": {"positions": "none"}, "position_synonyms": {"positions": "synonym"},
               "telegraphic": {"telegraphic": True}, "plural": {"plural": True}, "no_article": {"article": False},
               "casing": {"casing": True}}
    if form not in changes:
        raise NextStepError(f"phrasing form {form!r} is not one of {', '.join(FORMS)}")
    return Phrasing(**changes[form])


# How often random_phrasing picks each option of the three main choices (relative weights):
# sizes and positions ('word', 'synonym', 'none'), the background ('last', 'first', 'none').
PHRASING_OPTIONS = {"sizes": ("word", "synonym", "none"), "positions": ("word", "synonym", "none"),
                    "background": ("last", "first", "none")}
PHRASING_WEIGHTS = {"sizes": (2, 1, 2), "positions": (5, 3, 1), "background": (3, 1, 2)}


def random_phrasing(rng: np.random.Generator, weights: dict[str, tuple[float, ...]] | None = None) -> Phrasing:
    """Every choice drawn independently; with the default PHRASING_WEIGHTS about one caption in
    seven comes out in the exact grammar. `weights` replaces some of PHRASING_WEIGHTS (training's
    `--phrasing-weights`); the held-out lists always use the defaults."""
    weights = {**PHRASING_WEIGHTS, **(weights or {})}

    def pick(choice):
        odds = np.asarray(weights[choice], dtype=np.float64)
        return PHRASING_OPTIONS[choice][int(rng.choice(len(odds), p=odds / odds.sum()))]

    return Phrasing(sizes=pick("sizes"), positions=pick("positions"), background=pick("background"),
                    telegraphic=bool(rng.random() < 0.15), plural=bool(rng.random() < 0.5),
                    article=bool(rng.random() < 0.7), casing=bool(rng.random() < 0.3))


def parse_phrasing_weights(text: str) -> dict[str, tuple[float, ...]]:
    """'positions=5:3:3,background=3:1:3' -> {'positions': (5.0, 3.0, 3.0), 'background': (3.0, 1.0, 3.0)}:
    weights of the options of PHRASING_OPTIONS, in that order."""
    weights = {}
    for item in text.split(","):
        choice, _, values = item.strip().partition("=")
        if choice not in PHRASING_OPTIONS:
            raise SystemExit(f"--phrasing-weights: {choice!r} is not one of {', '.join(PHRASING_OPTIONS)}")
        options = PHRASING_OPTIONS[choice]
        try:
            odds = tuple(float(v) for v in values.split(":"))
        except ValueError:
            odds = ()
        if len(odds) != len(options) or min(odds) < 0 or sum(odds) <= 0:
            raise SystemExit(f"--phrasing-weights: {choice} needs {len(options)} weights for "
                             f"{':'.join(options)}, at least one above 0 (got {values!r})")
        weights[choice] = odds
    return weights


def scene_request(scene: Scene) -> Request:
    """Everything a scene shows, as a Request."""
    objects = tuple(ObjectSpec(o.shape, o.color, position_of(o.x, o.y, scene.width, scene.height), o.size)
                    for o in scene.objects)
    background = BackgroundSpec(scene.background, scene.background2,
                                None if scene.background2 is None else scene.split)
    return Request(objects, background)


def caption_request(text: str) -> Request:
    """The Request of a caption in the exact grammar (`scenes.caption`)."""
    return Request(tuple(parse_caption(text)), parse_background(text))


def _choose(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _object_words(obj: ObjectSpec, how: Phrasing, rng, with_color: bool = True) -> tuple[str, ObjectSpec]:
    """(phrase, what it asks for) for one object, without its article."""
    size = {"word": obj.size, "synonym": _choose(rng, SIZE_WORDS[obj.size]) if obj.size else None,
            "none": None}[how.sizes]
    words = " ".join(w for w in (size, obj.color if with_color else None, obj.shape) if w)
    asked = replace(obj, size=obj.size if size else None)
    if how.positions == "none":
        return words, replace(asked, position=None)
    if how.telegraphic:
        return f"{words}, {_choose(rng, TELEGRAPHIC_PLACES[obj.position])}", asked
    place = PLACE_PHRASES[obj.position] if how.positions == "word" else _choose(rng, PLACE_SYNONYMS[obj.position])
    return f"{words} {place}", asked


def _background_words(background: BackgroundSpec, telegraphic: bool) -> str:
    if background.color2 is None:
        return (f"{background.color} background" if telegraphic
                else f"{article(background.color)} {background.color} background")
    ends = ("at the top", "at the bottom") if background.split == "top-bottom" else ("on the left", "on the right")
    return f"a background that is {background.color} {ends[0]} and {background.color2} {ends[1]}"


def _join(phrases: list[str], telegraphic: bool) -> str:
    if telegraphic:
        return "; ".join(phrases)
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _shared_colour_pair(objects) -> tuple[int, int] | None:
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            if objects[i].color == objects[j].color:
                return i, j
    return None


def phrase(request: Request, how: Phrasing, rng: np.random.Generator) -> tuple[str, Request]:
    """(caption, what it asks for) for a scene's Request said the `how` way; rng picks synonyms.

    `plural` applies only when two objects share a colour and the caption is not telegraphic."""
    pair = None if how.telegraphic or not how.plural else _shared_colour_pair(request.objects)
    phrases, asked = [], []
    for i, obj in enumerate(request.objects):
        words, spec = _object_words(obj, how, rng, with_color=pair is None or i not in pair)
        if how.article and not how.telegraphic:
            words = f"{article(words)} {words}"
        phrases.append(words)
        asked.append(spec)
    if pair is None:
        text = _join(phrases, how.telegraphic)
    else:  # "a blue triangle at the bottom, and a circle on the left and a square at the top, both red"
        i, j = pair
        both = f"{phrases[i]} and {phrases[j]}, both {request.objects[i].color}"
        others = [p for k, p in enumerate(phrases) if k not in pair]
        text = f"{_join(others, False)}, and {both}" if others else both
    background = None
    if how.background != "none" and request.background is not None:
        background = request.background
        words = _background_words(background, how.telegraphic)
        if how.telegraphic:
            text = f"{words}; {text}" if how.background == "first" else f"{text}; {words}"
        else:
            text = f"on {words}, {text}" if how.background == "first" else f"{text}, on {words}"
    if how.casing:
        text = text[0].upper() + text[1:] + "."
    return text, Request(tuple(asked), background)


def in_reading_order(request: Request, how: Phrasing) -> tuple[Request, Phrasing]:
    """The request's objects sorted by their cells in reading order (POSITIONS: top left first,
    bottom right last), and `how` without `plural` where grouping the shared colour at the end
    would break that order. Objects without a position keep their place (stable sort)."""
    rank = {position: i for i, position in enumerate(POSITIONS)}
    objects = tuple(sorted(request.objects, key=lambda o: rank.get(o.position, -1)))
    pair = _shared_colour_pair(objects) if how.plural and not how.telegraphic else None
    if pair is not None and pair != (len(objects) - 2, len(objects) - 1):
        how = replace(how, plural=False)
    return Request(objects, request.background), how


def default_background(colors) -> str:
    """The background a training caption that names none stands for: white, or black when one of
    the objects (`colors`) is white. So a caption without a background never asks the model to
    choose a colour, and the one it learns never hides an object."""
    return "black" if "white" in colors else "white"


def free_caption(caption: str, rng: np.random.Generator, weights: dict | None = None,
                 reading_order: bool = True, default_only: bool = True) -> str:
    """A random free phrasing (random_phrasing, with these weights) of an exact-grammar caption, for
    training. With `reading_order`, a phrasing that names no positions names the objects in the
    order they appear (`in_reading_order`), so the model can bind the k-th object it draws to the
    k-th it was asked for; the caption grammar itself lists them in any order. With `default_only`,
    the background is left out only where it is the plain `default_background` of the objects
    (said last otherwise)."""
    request, how = caption_request(caption), random_phrasing(rng, weights)
    if reading_order and how.positions == "none":
        request, how = in_reading_order(request, how)
    background = request.background
    if default_only and how.background == "none" and (
            background is None or background.color2 is not None
            or background.color != default_background([o.color for o in request.objects])):
        how = replace(how, background="last")
    return phrase(request, how, rng)[0]


# Edit instructions (scenes.random_edit's grammar) vary less: the object to change keeps its colour
# and shape (they name it); a moved object's target and an added object are said as above.
MOVE_TARGETS = {"top left": ("upper left", "top left corner"), "top": ("top",), "top right": ("upper right",),
                "left": ("left side", "left"), "center": ("middle", "centre", "center"),
                "right": ("right side", "right"), "bottom left": ("lower left", "bottom left corner"),
                "bottom": ("bottom",), "bottom right": ("lower right", "bottom right corner")}
_MOVE_RE = re.compile(r"^move the (\w+ \w+) to the (.+)$")
_ADD_RE = re.compile(r"^add (.+)$")


def phrase_instruction(instruction: str, how: Phrasing, rng: np.random.Generator) -> tuple[str, str | None]:
    """(instruction, size the edit still asks for) for an exact-grammar instruction said the `how`
    way: a move's target cell by a synonym, an added object as in `phrase` (its position always
    named), casing. The size is that of an added object (None when left free, or for other edits)."""
    size = None
    if (move := _MOVE_RE.match(instruction)) and how.positions == "synonym":
        instruction = f"move the {move[1]} to the {_choose(rng, MOVE_TARGETS[move[2]])}"
    elif add := _ADD_RE.match(instruction):
        obj = parse_caption(add[1])[0]
        words, asked = _object_words(obj, replace(how, positions=how.positions.replace("none", "word"),
                                                  telegraphic=False), rng)
        instruction, size = f"add {article(words) + ' ' if how.article else ''}{words}", asked.size
    if how.casing:
        instruction = instruction[0].upper() + instruction[1:] + "."
    return instruction, size


def free_instruction(instruction: str, rng: np.random.Generator, weights: dict | None = None) -> str:
    """A random free phrasing (random_phrasing, with these weights) of an exact-grammar edit
    instruction, for training."""
    return phrase_instruction(instruction, random_phrasing(rng, weights), rng)[0]
