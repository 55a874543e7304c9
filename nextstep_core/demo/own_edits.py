"""Edit triples on the model's own drawings: what a chain of edits feeds the model.

In a chain every pass after the first edits an image the model drew, with its soft edges and
slightly off colours, not a crisp rendered scene. Here a model draws random scenes from their
exact captions; each drawing the checker finds right (every object and the background) becomes
the source of an edit (scenes.random_edit on its scene), and the target is that same drawing
changed only where the edit says (`apply_edit`), so everything else stays pixel for pixel what
the model drew:

    recolour   the object's pixels keep their coverage, in the new colour
    remove     the object's pixels (and one around them) go back to the background
    move       removed, and its own pixels pasted at the new cell's centre
    add        the new object, rendered, painted onto the drawing

An object's coverage of a pixel (`coverage`) is read from the drawing: the pixel's colour
projected on the line from the background's colour to the object's. Triples whose target the
checker does not find right (edit_eval.edit_parts) are dropped.

    python -m nextstep_core.demo.own_edits --model nextstep_core/demo_model --count 1500 --out runs/own.npz

`train model --own-edits runs/own.npz` adds them to the training edits.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from .checker import find_objects, score
from .edit_eval import edit_kind_of, edit_parts, parse_edit_kinds
from .scenes import PALETTE, Scene, SceneObject, caption, random_edit, random_scene, render, shape_mask

BOX_MARGIN = 2  # pixels around an object's found box that its soft edge may cover
ERASE_COVERAGE = 0.05  # a removed or moved object's pixels: those it covers by more, grown by one pixel


def _rgb(color: str) -> np.ndarray:
    return np.asarray(PALETTE[color], dtype=np.float64)


def empty_background(scene: Scene) -> np.ndarray:
    """HxWx3 float pixels of the scene's background alone."""
    return np.asarray(render(replace(scene, objects=())), dtype=np.float64)


def object_box(pixels: np.ndarray, obj: SceneObject) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the drawn object of this colour and shape, widened by BOX_MARGIN."""
    hits = [f for f in find_objects(pixels.astype(np.uint8)) if (f.color, f.shape) == (obj.color, obj.shape)]
    if len(hits) != 1:
        raise ValueError(f"the drawing has {len(hits)} {obj.color} {obj.shape}s")
    x0, y0, x1, y1 = hits[0].bbox
    height, width = pixels.shape[:2]
    return (max(0, x0 - BOX_MARGIN), max(0, y0 - BOX_MARGIN), min(width, x1 + BOX_MARGIN),
            min(height, y1 + BOX_MARGIN))


def coverage(pixels: np.ndarray, background: np.ndarray, color: str, box) -> np.ndarray:
    """HxW share in [0, 1] of each pixel inside `box` that the object of `color` covers; 0 outside."""
    direction = _rgb(color) - background
    share = (pixels - background) * direction
    share = share.sum(-1) / np.maximum((direction**2).sum(-1), 1e-6)
    alpha = np.zeros(pixels.shape[:2])
    x0, y0, x1, y1 = box
    alpha[y0:y1, x0:x1] = np.clip(share[y0:y1, x0:x1], 0, 1)
    return alpha


def _grown(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours of every pixel in it."""
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= _shifted(mask, dx, dy)
    return out


def _shifted(alpha: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """alpha moved by (dx, dy) pixels, zero where it came from outside."""
    out = np.zeros_like(alpha)
    height, width = alpha.shape
    ys, xs = slice(max(0, dy), min(height, height + dy)), slice(max(0, dx), min(width, width + dx))
    out[ys, xs] = alpha[max(0, -dy):min(height, height - dy), max(0, -dx):min(width, width - dx)]
    return out


def apply_edit(drawing, source: Scene, target: Scene) -> np.ndarray:
    """The drawing (of `source`) with the edit from `source` to `target` applied (module docstring),
    as HxWx3 uint8."""
    pixels = np.asarray(drawing, dtype=np.float64)
    background = empty_background(source)
    old = [o for o in source.objects if o not in target.objects]
    new = [o for o in target.objects if o not in source.objects]
    kind = edit_kind_of(source, target)
    out = pixels.copy()
    if kind in ("recolour", "remove", "move"):
        box = object_box(pixels, old[0])
        alpha = coverage(pixels, background, old[0].color, box)[..., None]
        if kind == "recolour":
            out += alpha * (_rgb(new[0].color) - _rgb(old[0].color))
        else:  # every pixel the object touches, and one around them, back to the background
            erased = _grown(alpha[..., 0] > ERASE_COVERAGE)
            out[erased] = background[erased]
        if kind == "move":
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            moved = _shifted(alpha[..., 0], round(new[0].x - centre[0]), round(new[0].y - centre[1]))[..., None]
            out = out * (1 - moved) + moved * _rgb(new[0].color)
    elif kind == "add":
        mask = shape_mask(new[0], target.width, target.height)[..., None]
        out = np.where(mask, _rgb(new[0].color), out)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def own_edit_triples(pipe, count: int, *, seed: int = 17, batch: int = 12, weights: dict | None = None,
                     size=(64, 64), **sampling) -> tuple[list, list, list]:
    """(sources, instructions, targets) from `count` drawings of random scenes by `pipe`: uint8
    images and exact-grammar instructions, only the triples whose drawing and target are right."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, *size) for _ in range(count)]
    sources, instructions, targets = [], [], []
    for i in range(0, count, batch):
        chunk = scenes[i:i + batch]
        images = pipe.generate([caption(s) for s in chunk], width=size[0], height=size[1], seed=seed + i,
                               **sampling).to_pil()
        for scene, image in zip(chunk, images):
            if score(image, caption(scene)) < 0.999:
                continue
            _, instruction, after = random_edit(rng, scene, weights=weights)
            try:
                edited = apply_edit(image, scene, after)
            except ValueError:
                continue
            if all(edit_parts(edited, scene, after).values()):
                sources.append(np.asarray(image.convert("RGB")))
                instructions.append(instruction)
                targets.append(edited)
    return sources, instructions, targets


def save_triples(path: Path, sources, instructions, targets) -> None:
    np.savez_compressed(path, sources=np.stack(sources), targets=np.stack(targets),
                        instructions=np.array(instructions))


def load_triples(path: Path) -> list[tuple[np.ndarray, str, np.ndarray]]:
    """(source, instruction, target) uint8 triples written by save_triples."""
    with np.load(path, allow_pickle=False) as data:
        return list(zip(data["sources"], (str(t) for t in data["instructions"]), data["targets"]))


def main(argv: list[str] | None = None) -> int:
    from ..pipeline import NextStepPipeline

    parser = argparse.ArgumentParser(prog="python -m nextstep_core.demo.own_edits", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(Path(__file__).parent.parent / "demo_model"))
    parser.add_argument("--count", type=int, default=1000, help="drawings to make (the wrong ones are dropped)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--edit-kinds", type=parse_edit_kinds, metavar="KIND=W,...")
    parser.add_argument("--out", required=True, help=".npz file to write")
    args = parser.parse_args(argv)
    pipe = NextStepPipeline.from_folder(args.model)
    sources, instructions, targets = own_edit_triples(pipe, args.count, seed=args.seed, weights=args.edit_kinds)
    save_triples(Path(args.out), sources, instructions, targets)
    print(f"{len(sources)} triples from {args.count} drawings in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
