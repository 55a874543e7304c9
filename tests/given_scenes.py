"""Held-out demo scenes for the given-token acceptance checks (tests/test_given_demo.py and
benchmarks/given_tokens.py): continuation, region redraw and masked edit cases, with their
masks. Seeds 3000-3002 are not used by training (0-2) nor by demo/evaluate.py (1000, 2000)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from nextstep_core.demo.scenes import POSITIONS, SceneObject, free_kinds, position_of, random_edit, random_scene

CONTINUATION_SEED, REGION_SEED, EDIT_SEED = 3000, 3001, 3002


def cell_mask(positions, width: int = 64, height: int = 64) -> torch.Tensor:
    """(H, W) float mask (ComfyUI's MASK convention), 1 on the named 3x3 grid cells: the pixels
    whose centre... as scenes.position_of reads them (x * 3 // width == column)."""
    xs, ys = np.arange(width), np.arange(height)
    mask = np.zeros((height, width), dtype=np.float32)
    for position in positions:
        index = POSITIONS.index(position)
        rows = (ys * 3 // height) == index // 3
        cols = (xs * 3 // width) == index % 3
        mask[np.ix_(rows, cols)] = 1
    return torch.from_numpy(mask)


def cell_of(obj: SceneObject, width: int = 64, height: int = 64) -> str:
    return position_of(obj.x, obj.y, width, height)


def continuation_cases(count: int):
    """Held-out scenes; a continuation keeps their top half and is prompted with their caption."""
    rng = np.random.default_rng(CONTINUATION_SEED)
    return [random_scene(rng) for _ in range(count)]


def region_cases(count: int):
    """(source, target, mask): the source's first object replaced, in its own cell and at its own
    place and size, by one of another shape and colour; the mask is that object's grid cell."""
    rng = np.random.default_rng(REGION_SEED)
    cases = []
    for _ in range(count):
        source = random_scene(rng)
        old = source.objects[0]
        kinds = [(s, c) for s, c in free_kinds(source) if s != old.shape and c != old.color]
        shape, color = kinds[int(rng.integers(len(kinds)))]
        target = replace(source, objects=(replace(old, shape=shape, color=color), *source.objects[1:]))
        cases.append((source, target, cell_mask([cell_of(old)])))
    return cases


def edit_cases(count: int):
    """(source, instruction, target, mask): held-out edits; the mask covers the grid cells of every
    object the edit adds, removes, moves or recolours (in the source and in the target)."""
    rng = np.random.default_rng(EDIT_SEED)
    cases = []
    for _ in range(count):
        source, instruction, target = random_edit(rng, random_scene(rng))
        changed = set(source.objects) ^ set(target.objects)
        cases.append((source, instruction, target, cell_mask(sorted({cell_of(o) for o in changed}))))
    return cases
