"""Edits scored in parts, three-pass chains, and backgrounds that hide an object.

An edit's checker score (evaluate.py) mixes what the edit asked for with everything it should
have left alone, so copying the source image unchanged already scores about 0.67. Here the two
are separate (`edit_parts`):

    did the edit    the named change happened and the edited object is otherwise unchanged:
                    recolour: the object in its new colour, same shape, size and cell, and not
                    in its old colour; move: the object in its new cell, same colour, shape and
                    size, and not in its old cell; add: the new object as asked (colour, shape,
                    size, cell); remove: no object of its colour and shape left
    kept the rest   every other object of the scene found with its colour, shape, size and
                    cell, nothing found that the target scene (or the edit's own failure) does
                    not explain, and the background kept

Chains (`held_out_chains`, `chain_scores`): draw a held-out scene from its exact caption, then
three edits, each on the previous pass's output image, each scored against the scene as it
should be after that pass. A chain is right when every pass is (the drawing: every object and
the background right; an edit: did the edit and kept the rest).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .checker import (
    ObjectSpec,
    as_pixels,
    background_of,
    match_count,
    objects_of,
    palette_labels,
    score,
)
from .phrasing import scene_request
from .scenes import EDIT_KINDS, Scene, SceneObject, caption, position_of, random_edit, random_scene

if TYPE_CHECKING:
    from ..pipeline import NextStepPipeline

CHAIN_SEED = 5000  # the chains' own stream, apart from training's (< 100) and the other held-out lists
CHAIN_PASSES = 3


def object_spec(obj: SceneObject, scene: Scene) -> ObjectSpec:
    """Everything the checker can see of one object: shape, colour, cell and size."""
    return ObjectSpec(obj.shape, obj.color, position_of(obj.x, obj.y, scene.width, scene.height), obj.size)


def edit_kind_of(source: Scene, target: Scene) -> str:
    """The EDIT_KINDS entry that turns `source` into `target` (told by the objects that differ)."""
    old = [o for o in source.objects if o not in target.objects]
    new = [o for o in target.objects if o not in source.objects]
    if old and new:
        return "recolour" if old[0].color != new[0].color else "move"
    return "add" if new else "remove"


def edit_parts(image, source: Scene, target: Scene) -> dict[str, bool]:
    """Whether an edited image did the edit, kept the other objects, kept the background, and
    kept the rest (both), judged against the edit's source and target scenes (module docstring)."""
    labels = palette_labels(as_pixels(image))
    found = objects_of(labels)
    kind = edit_kind_of(source, target)
    old = [object_spec(o, source) for o in source.objects if o not in target.objects]
    new = [object_spec(o, target) for o in target.objects if o not in source.objects]
    others = [object_spec(o, target) for o in target.objects if o in source.objects]
    if kind == "remove":
        gone = ObjectSpec(old[0].shape, old[0].color, None, None)  # anywhere, of any size
        did = match_count([gone], found) == 0
    else:
        did = match_count(new, found) == len(new) and match_count(old, found) == 0
    explained = match_count(others + new + old, found)
    kept_objects = match_count(others, found) == len(others) and explained == len(found)
    kept_background = background_of(labels) == scene_request(target).background
    return {"did_edit": bool(did), "kept_objects": bool(kept_objects), "kept_background": bool(kept_background),
            "kept_rest": bool(kept_objects and kept_background)}


def summarise_parts(parts: list[dict[str, bool]], kinds: list[str]) -> dict:
    """Per edit kind and over all edits: the share that did the edit, kept the other objects,
    kept the background, kept the rest, and did all of it ("right")."""
    def shares(rows):
        out = {key: float(np.mean([r[key] for r in rows])) for key in ("did_edit", "kept_rest", "kept_objects",
                                                                        "kept_background")}
        out["right"] = float(np.mean([r["did_edit"] and r["kept_rest"] for r in rows]))
        out["edits"] = len(rows)
        return out

    per_kind = {kind: shares([p for p, k in zip(parts, kinds) if k == kind]) for kind in EDIT_KINDS if kind in kinds}
    return {"per_kind": per_kind, "all": shares(parts)} if parts else {"per_kind": {}, "all": None}


def held_out_chains(count: int, size=(64, 64), passes: int = CHAIN_PASSES) -> list[tuple[Scene, list]]:
    """`count` held-out chains: (scene, [(instruction, scene after it), ...] for `passes` edits),
    each edit drawn (scenes.random_edit) on the scene the one before it should have made."""
    rng = np.random.default_rng(CHAIN_SEED)
    chains = []
    for _ in range(count):
        scene = state = random_scene(rng, *size)
        steps = []
        for _ in range(passes):
            _, instruction, state = random_edit(rng, state)
            steps.append((instruction, state))
        chains.append((scene, steps))
    return chains


def chain_seed(seed: int, index: int, step: int) -> int:
    """The sampling seed of pass `step` (0: the drawing) of chain `index`."""
    return seed + 1000 * step + index


def run_chain(pipe: NextStepPipeline, scene: Scene, edits: list, seed: int, **sampling) -> list:
    """The images of one chain (`edits`: [(instruction, scene after it), ...]): the scene drawn from
    its caption, then each edit on the image before."""
    image = pipe.generate(caption(scene), width=scene.width, height=scene.height, seed=seed, **sampling).to_pil()[0]
    images = [image]
    for p, (instruction, _) in enumerate(edits, start=1):
        image = pipe.generate(f"<image> {instruction}", image=image, seed=seed + 1000 * p, **sampling).to_pil()[0]
        images.append(image)
    return images


def chain_passes(images: list, scene: Scene, steps: list) -> list[dict[str, bool]]:
    """Per pass of one chain: {"right", and for the edits did_edit / kept_rest / ...}."""
    results = [{"right": score(images[0], caption(scene)) >= 0.999}]
    before = scene
    for image, (_, after) in zip(images[1:], steps):
        parts = edit_parts(image, before, after)
        results.append({**parts, "right": parts["did_edit"] and parts["kept_rest"]})
        before = after
    return results


def chain_scores(pipe: NextStepPipeline, count: int, *, seed: int = 0, size=(64, 64), **sampling) -> dict:
    """The share of `count` held-out chains right at every pass, and per pass the share right and
    (for the edits) the share that did the edit and that kept the rest."""
    started = time.perf_counter()
    chains = held_out_chains(count, size)
    rows = []
    for k, (scene, edits) in enumerate(chains):
        rows.append(chain_passes(run_chain(pipe, scene, edits, chain_seed(seed, k, 0), **sampling), scene, edits))
    per_pass = []
    for p in range(CHAIN_PASSES + 1):
        entry = {"right": float(np.mean([r[p]["right"] for r in rows]))}
        if p:
            entry.update({key: float(np.mean([r[p][key] for r in rows])) for key in ("did_edit", "kept_rest")})
        per_pass.append(entry)
    return {"chains": count, "chains_right": float(np.mean([all(p["right"] for p in r) for r in rows])),
            "chain_per_pass": per_pass, "chain_seconds": round(time.perf_counter() - started, 1)}


def parse_edit_kinds(text: str) -> dict[str, float]:
    """'remove=3,recolour=2' -> {'remove': 3.0, 'recolour': 2.0}: relative weights of the edit
    kinds (scenes.EDIT_KINDS) in the training edits; a kind not named weighs 1."""
    weights = {}
    for item in text.split(","):
        kind, _, factor = item.strip().partition("=")
        if kind not in EDIT_KINDS:
            raise SystemExit(f"--edit-kinds: {kind!r} is not one of {', '.join(EDIT_KINDS)}")
        try:
            weights[kind] = float(factor)
        except ValueError:
            raise SystemExit(f"--edit-kinds: {item.strip()!r} is not KIND=WEIGHT") from None
        if not weights[kind] > 0:
            raise SystemExit(f"--edit-kinds: the weight of {kind} must be above 0, not {factor}")
    return weights


def hides_object(image, objects: list[ObjectSpec]) -> bool:
    """Whether the image's background (either colour of a two-tone one) has the colour of one of
    the objects asked for: such an object cannot be seen."""
    background = background_of(palette_labels(as_pixels(image)))
    if background is None:
        return False
    return bool({background.color, background.color2} & {o.color for o in objects})
