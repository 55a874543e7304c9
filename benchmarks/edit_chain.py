"""A 5-pass edit chain on the demo model, two ways: each pass edits the previous result as a
LatentImage (no decode / re-encode), or as decoded pixels re-encoded by the next pass (what a
chain through images does). The unedited part of the picture should not drift.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/edit_chain.py --scenes 12 --report benchmarks/edit_chain.json

Each held-out scene (seed 3003, not used in training) gets 5 recolour edits drawn one after
the other on the evolving scene ("make the red circle green", then another object or the same
one). The unedited region is every pixel outside the 16x16 token cells of the grid cells the
5 edits touch. Reported: PSNR (dB) of pass 5 against pass 1 over that region (images in
[0, 1]; identical pixels count as 99 dB, float rounding's floor; the decoder's receptive field
reaches across token cells, so pixels there move when edited tokens nearby do), and the
largest difference of the image tokens of those cells between pass 5 and pass 1, for
- `masked` edits (region = the edit's grid cells, so outside it the tokens are given from the
  edit image: from a LatentImage they are exactly the previous pass's tokens), and
- `plain` edits (every token sampled again each pass; the chain's input still differs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from given_scenes import cell_mask, cell_of  # noqa: E402

from nextstep_core import DEMO_MODEL, LatentImage, NextStepPipeline  # noqa: E402
from nextstep_core.demo.scenes import random_edit, random_scene, render  # noqa: E402
from nextstep_core.sampling.given import region_sampled_cells  # noqa: E402

CHAIN_SEED = 3003
PASSES = 5
IDENTICAL_DB = 99.0


def chains(count: int):
    """(source scene, [(instruction, mask of the grid cells it touches)] * PASSES) per scene."""
    rng = np.random.default_rng(CHAIN_SEED)
    out = []
    for _ in range(count):
        scene = source = random_scene(rng)
        steps = []
        for _ in range(PASSES):
            _, instruction, target = random_edit(rng, scene, "recolour")
            changed = set(scene.objects) ^ set(target.objects)
            steps.append((instruction, cell_mask(sorted({cell_of(o) for o in changed}))))
            scene = target
        out.append((source, steps))
    return out


def untouched_pixels(masks, pixels_per_token: int = 16) -> torch.Tensor:
    """(H, W) bool: pixels outside every token cell that any pass's mask overlaps."""
    sampled = torch.zeros_like(region_sampled_cells(masks[0] > 0, pixels_per_token))
    for mask in masks:
        sampled |= region_sampled_cells(mask > 0, pixels_per_token)
    cells = sampled.repeat_interleave(pixels_per_token, 0).repeat_interleave(pixels_per_token, 1)
    return ~cells


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    mse = float(((a - b) ** 2)[where].mean())
    return IDENTICAL_DB if mse == 0 else min(IDENTICAL_DB, 10 * math.log10(1 / mse))


def run_chain(pipe, source, steps, *, latent: bool, masked: bool, seed: int, **sampling) -> list:
    """The results of every pass."""
    image, results = render(source), []
    for i, (instruction, mask) in enumerate(steps):
        result = pipe.generate(f"<image> {instruction}", image=image, region=mask if masked else None,
                               seed=seed + i, **sampling)
        results.append(result)
        image = LatentImage(result.latents) if latent else result.images[0]  # pixels: re-encoded next pass
    return results


def measure(pipe, count: int, **sampling) -> dict:
    started = time.perf_counter()
    names = [f"{kind}_{way}" for kind in ("masked", "plain") for way in ("latent", "pixels")]
    table, drift = {name: [] for name in names}, {name: 0.0 for name in names}
    for n, (source, steps) in enumerate(chains(count)):
        where = untouched_pixels([mask for _, mask in steps])
        if not where.any():
            continue
        cells = where[::16, ::16].reshape(-1)
        for name in names:
            kind, way = name.split("_")
            results = run_chain(pipe, source, steps, latent=way == "latent", masked=kind == "masked",
                                seed=100 * n, **sampling)
            table[name].append(psnr(results[-1].images[0], results[0].images[0], where))
            moved = (results[-1].tokens[0, cells] - results[0].tokens[0, cells]).abs().max().item()
            drift[name] = max(drift[name], moved)
    report = {name: {"mean_psnr_db": float(np.mean(table[name])), "max_token_drift": drift[name],
                     "per_scene": table[name]} for name in names}
    report.update(scenes=len(table["masked_latent"]), passes=PASSES, seconds=round(time.perf_counter() - started, 1))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--scenes", type=int, default=12)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--report")
    args = parser.parse_args(argv)
    pipe = NextStepPipeline.from_folder(args.model)
    report = measure(pipe, args.scenes, **({} if args.steps is None else {"steps": args.steps}))
    print(json.dumps({k: ({m: x for m, x in v.items() if m != "per_scene"} if isinstance(v, dict) else v)
                      for k, v in report.items()}, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
