"""Next-set decoding (parallel_window) and annealed head steps (head_steps_floor): what they cost
in quality on the demo model, and what they can save at the 14B decoder's layer shapes.

    # (a) scores: checker score vs forward passes per token on the demo model (no timing)
    nice -n 15 .venv/bin/python benchmarks/parallel_decoding.py scores --count 24 --seeds 0,1 \
        --out benchmarks/parallel_decoding.json
    # (b) timing: one decoder pass carrying k tokens per guidance row at the 14B layer shapes,
    #     and the w sweep's decoder time predicted from it (quiet machine only)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/parallel_decoding.py passes --layers 2 \
        --out benchmarks/parallel_passes.json
    .venv/bin/python benchmarks/parallel_decoding.py passes --small        # the same code, tiny shapes
    .venv/bin/python benchmarks/parallel_decoding.py smoke                 # 256x256 demo: runs, passes as predicted
    .venv/bin/python benchmarks/parallel_decoding.py picture               # docs/images/parallel_windows.png
    # (c) wall time per 128x128 demo image, sequential vs each w, interleaved in one process (quiet machine only)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/parallel_decoding.py walltime --repeats 5 \
        --out benchmarks/parallel_walltime.json

(a) For each size (64, 96, 128, 128x64) and seed: the free-phrased held-out captions
(demo/evaluate.py free_phrased_captions) and the held-out scenes' own captions, drawn at
w in {0, 1, 2, 3, 4} (row starts "copy"; w 1 and 2 also "masked"), and with annealed head steps
(w 0 and w 2, floor --floor). Per configuration: the mean checker score, forward passes per
token (GenerationResult.forward_passes / tokens), head evaluations per token, and the column-0
seam statistic: the share of off-palette pixels (demo/checker.py palette_labels -1) in the
column-0 token cells of rows 1.. (where next-set decoding starts a row before the row above is
done) over the same share in the other cells of rows 1.. (1.0: no seam; sequential is the
baseline); and, when w0 runs first, changed_column0 / changed_other: the share of pixels whose
palette label differs from the sequential image of the same caption and seed, in the same two
bands (palette-coloured errors count here, not in the first statistic).

(b) A Qwen2 decoder with the 14B layer shapes (hidden 5120, 40 query / 8 key-value heads, MLP
13824; --layers of them, random weights), rows = 2 (text guidance), a slot KV cache of
--context filled positions: the fastest of --repeats passes for k in 1, 2, 4, 8, 16 queries per
row, and time per token at k over time at 1. Then for a 32 x 32 grid and w in 0, 1, 2, 4, 8, 16:
the passes (parallel_schedule.plan_passes), queries per pass, and the decoder time predicted
from the measured k (linear in between).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nextstep_core.sampling.parallel import SlotCache  # noqa: E402
from nextstep_core.sampling.parallel_schedule import plan_passes  # noqa: E402

SIZES = ((64, 64), (96, 96), (128, 128), (128, 64))
WINDOWS = (0, 1, 2, 3, 4)
TOKENS_PER_PASS = (1, 2, 4, 8, 16)
GRID_WINDOWS = (0, 1, 2, 4, 8, 16)
SHAPES_14B = dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, intermediate_size=13824)
SHAPES_SMALL = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
PIXELS_PER_TOKEN = 16


# --- (a) scores on the demo model ------------------------------------------------------------------

def configurations(floor: int) -> dict[str, dict]:
    """name -> (generate options, row start)."""
    configs = {f"w{w}": dict(parallel_window=w) for w in WINDOWS}
    for w in (1, 2):
        configs[f"w{w}_masked"] = dict(parallel_window=w, row_start="masked")
    for w in (2, 3, 4):
        configs[f"w{w}_above"] = dict(parallel_window=w, row_start="above")
    configs["anneal"] = dict(head_steps_floor=floor)
    for w in (2, 3, 4):
        configs[f"w{w}_anneal"] = dict(parallel_window=w, head_steps_floor=floor)
    return configs


def seam_rates(image, size: tuple[int, int]) -> tuple[float, float]:
    """(off-palette share in the column-0 cells of rows 1.., the same in the other cells of rows 1..)."""
    from nextstep_core.demo.checker import as_pixels, palette_labels

    off = palette_labels(as_pixels(image)) < 0
    width, height = size
    p = PIXELS_PER_TOKEN
    below = off[p:] if height > p else off[:0]
    return float(below[:, :p].mean()) if below.size else 0.0, float(below[:, p:].mean()) if below.size else 0.0


def changed_rates(image, sequential, size: tuple[int, int]) -> tuple[float, float]:
    """(share of pixels whose palette label differs from the sequential image's of the same
    caption and seed, in the column-0 cells of rows 1..; the same in the other cells of rows 1..).
    Palette-coloured errors count too, which seam_rates cannot see."""
    from nextstep_core.demo.checker import as_pixels, palette_labels

    changed = palette_labels(as_pixels(image)) != palette_labels(as_pixels(sequential))
    p = PIXELS_PER_TOKEN
    below = changed[p:]
    return (float(below[:, :p].mean()), float(below[:, p:].mean())) if below.size else (0.0, 0.0)


def draw(pipe, prompts: list[str], size, seed: int, options: dict, batch: int):
    """Images, forward passes and head evaluations of `prompts` at one size, `batch` per call."""
    import nextstep_core.sampling.parallel as parallel

    options = dict(options)
    previous = parallel.ROW_START
    parallel.ROW_START = options.pop("row_start", "copy")
    images, passes, evaluations, tokens = [], [], [], (size[0] // 16) * (size[1] // 16)
    try:
        for i in range(0, len(prompts), batch):
            result = pipe.generate(prompts[i:i + batch], width=size[0], height=size[1], seed=seed + i, **options)
            images += result.to_pil()
            passes.append(result.forward_passes / tokens)
            evaluations.append(result.head_evaluations / tokens)  # per raster position, for all images at once
    finally:
        parallel.ROW_START = previous
    return images, float(np.mean(passes)), float(np.mean(evaluations))


def scores(pipe, *, count: int, seeds: list[int], sizes=SIZES, floor: int | None = None, batch: int = 12,
           configs: list[str] | None = None) -> dict:
    from nextstep_core.demo.checker import score, score_specs
    from nextstep_core.demo.evaluate import free_phrased_captions, held_out_scenes
    from nextstep_core.demo.scenes import caption

    steps = pipe.sampler_settings().steps
    floor = floor or max(2, steps // 3)
    chosen = {k: v for k, v in configurations(floor).items() if configs is None or k in configs}
    out: dict = {"steps": steps, "floor": floor, "count": count, "seeds": seeds, "sizes": {}}
    for size in sizes:
        free = free_phrased_captions(count, size)
        scenes = held_out_scenes(count, size)
        rows, sequential = {}, {}
        for name, options in chosen.items():
            free_scores, scene_scores, column0, others, passes, evaluations = [], [], [], [], [], []
            changed = []
            for seed in seeds:
                images, per_token, heads = draw(pipe, [p[1] for p in free], size, seed, options, batch)
                free_scores += [score_specs(im, p[2], p[3]) for im, p in zip(images, free)]
                passes.append(per_token)
                evaluations.append(heads)
                scene_images, _, _ = draw(pipe, [caption(s) for s in scenes], size, seed, options, batch)
                scene_scores += [score(im, caption(s)) for im, s in zip(scene_images, scenes)]
                seam = [seam_rates(im, size) for im in images + scene_images]
                column0 += [a for a, _ in seam]
                others += [b for _, b in seam]
                if name == "w0":
                    sequential[seed] = images + scene_images
                if seed in sequential:
                    changed += [changed_rates(im, base, size) for im, base in
                                zip(images + scene_images, sequential[seed])]
            rows[name] = {
                "free_score": float(np.mean(free_scores)), "scene_score": float(np.mean(scene_scores)),
                "forward_passes_per_token": float(np.mean(passes)),
                "head_evaluations_per_token": float(np.mean(evaluations)),
                "off_palette_column0": float(np.mean(column0)), "off_palette_other": float(np.mean(others)),
                "seam_ratio": float(np.mean(column0) / max(np.mean(others), 1e-9)),
            }
            if changed:  # against sequential (w0 first): where the image moved, by column band
                rows[name].update(changed_column0=float(np.mean([a for a, _ in changed])),
                                  changed_other=float(np.mean([b for _, b in changed])))
            print(f"{size[0]}x{size[1]} {name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
        out["sizes"][f"{size[0]}x{size[1]}"] = rows
    return out


def smoke(pipe, size: int = 256, windows=(1, 2, 4)) -> dict:
    """The demo model at size² (16 tokens wide at 256²): each window runs, with the passes predicted."""
    from nextstep_core.sampling.parallel_schedule import predicted_forward_passes

    grid = (size // PIXELS_PER_TOKEN, size // PIXELS_PER_TOKEN)
    out = {}
    for w in windows:
        result = pipe.generate("a red circle on the left", width=size, height=size, seed=0, parallel_window=w)
        out[f"w{w}"] = {"forward_passes": result.forward_passes,
                        "predicted": predicted_forward_passes(grid, w),
                        "finite": bool(torch.isfinite(result.tokens).all())}
    return out


def picture(pipe, path: str, *, count: int = 4, size=(128, 128), seed: int = 0) -> dict:
    """A grid: one row per held-out free-phrased caption, one column per configuration
    (sequential, w 1-4, annealed), the same seed everywhere."""
    from nextstep_core.demo.evaluate import free_phrased_captions, sample_grid

    captions = [p[1] for p in free_phrased_captions(count, size)]
    columns = {"w0": {}, **{f"w{w}": dict(parallel_window=w) for w in (1, 2, 3, 4)},
               "anneal": dict(head_steps_floor=max(2, pipe.sampler_settings().steps // 3))}
    images = {name: draw(pipe, captions, size, seed, options, count)[0] for name, options in columns.items()}
    sample_grid([images[name][i] for i in range(count) for name in columns], columns=len(columns)).save(path)
    return {"picture": path, "columns": list(columns), "captions": captions, "seed": seed, "size": list(size)}


def walltime(pipe, *, size=(128, 128), repeats: int = 5, windows=(0, 2, 3, 4), count: int = 4) -> dict:
    """Seconds per image (one caption per call, the CLI's way) for each configuration, the
    configurations interleaved within every repeat so that a change in the machine's load hits all
    of them alike; per configuration the fastest repeat of the `count` captions' total, and the
    sequential time over it."""
    from nextstep_core.demo.evaluate import free_phrased_captions

    captions = [p[1] for p in free_phrased_captions(count, size)]
    floor = max(2, pipe.sampler_settings().steps // 3)
    configs = {f"w{w}": dict(parallel_window=w) for w in windows}
    configs["anneal"] = dict(head_steps_floor=floor)
    for w in windows[1:3]:
        configs[f"w{w}_anneal"] = dict(parallel_window=w, head_steps_floor=floor)
    pipe.generate(captions[0], width=size[0], height=size[1], seed=0)  # warm-up: first-call costs
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, options in configs.items():
            began = time.perf_counter()
            for i, text in enumerate(captions):
                pipe.generate(text, width=size[0], height=size[1], seed=i, **options)
            seconds[name].append((time.perf_counter() - began) / len(captions))
    best = {name: min(times) for name, times in seconds.items()}
    return {"size": list(size), "captions": count, "repeats": repeats, "floor": floor,
            "threads": torch.get_num_threads(),
            "seconds_per_image": {name: round(t, 4) for name, t in best.items()},
            "median_seconds_per_image": {name: round(float(np.median(t)), 4) for name, t in seconds.items()},
            "speedup_over_w0": {name: round(best["w0"] / t, 3) for name, t in best.items()}}


# --- (b) decoder passes at the 14B layer shapes --------------------------------------------------

def build_decoder(layers: int, shapes: dict, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(vocab_size=16, num_hidden_layers=layers, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, use_sliding_window=False,
                         **shapes)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2Model(config).to(dtype).eval()
    return model, config


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_pass(model, config, k: int, *, rows: int, context: int, repeats: int, device, dtype) -> float:
    """Seconds of the fastest of `repeats` decoder passes with k queries per row after `context`
    filled slots (the slot cache, a 4-D mask seeing the context and the earlier queries)."""
    total = context + k
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads

    def layer():  # a prefill cache layer whose keys/values are already at full length
        return SimpleNamespace(keys=torch.randn(rows, heads, total, dim, dtype=dtype, device=device),
                               values=torch.randn(rows, heads, total, dim, dtype=dtype, device=device))

    cache = SlotCache(SimpleNamespace(layers=[layer() for _ in range(config.num_hidden_layers)]), context, total)
    cache.positions = torch.arange(context, total, device=device)
    mask = torch.ones(rows, 1, k, total, dtype=torch.bool, device=device)
    mask[:, 0, :, context:] = torch.tril(torch.ones(k, k, dtype=torch.bool, device=device))
    positions = cache.positions.expand(rows, -1)
    embeds = torch.randn(rows, k, config.hidden_size, dtype=dtype, device=device)
    best = float("inf")
    for i in range(repeats + 2):
        synchronize(device)
        started = time.perf_counter()
        model(inputs_embeds=embeds, attention_mask={"full_attention": mask}, position_ids=positions, cache=cache,
              use_cache=True)
        synchronize(device)
        if i >= 2:  # two warm-up passes
            best = min(best, time.perf_counter() - started)
    return best


def predicted_grid_times(per_k: dict[int, float], grid: int = 32, windows=GRID_WINDOWS) -> dict:
    """For a grid x grid image: passes, queries per pass and the decoder time the k sweep predicts."""
    ks = sorted(per_k)

    def seconds(q: int) -> float:
        if q in per_k:
            return per_k[q]
        lower = max([k for k in ks if k < q], default=ks[0])
        upper = min([k for k in ks if k > q], default=ks[-1])
        if upper == lower:  # beyond the sweep: linear in q from the last two points
            lower, upper = ks[-2], ks[-1]
        slope = (per_k[upper] - per_k[lower]) / (upper - lower)
        return per_k[lower] + slope * (q - lower)

    out = {}
    sequential = None
    for w in windows:
        passes = plan_passes((grid, grid), w, [False] * grid * grid)
        queries = [len(p.queries) for p in passes]
        total = sum(seconds(q) for q in queries)
        sequential = total if w == 0 else sequential
        out[f"w{w}"] = {"passes": len(passes), "mean_queries": float(np.mean(queries)), "max_queries": max(queries),
                        "decoder_seconds": total, "speedup": sequential / total}
    return out


def passes(*, layers: int, small: bool, dtype: str, context: int, repeats: int, device: str) -> dict:
    shapes = SHAPES_SMALL if small else SHAPES_14B
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = torch.device(device)
    model, config = build_decoder(layers, shapes, torch_dtype, device)
    per_k = {}
    for k in TOKENS_PER_PASS:
        per_k[k] = time_pass(model, config, k, rows=2, context=context, repeats=repeats, device=device,
                             dtype=torch_dtype)
        print(f"k={k}: {1e3 * per_k[k]:.2f} ms per pass", file=sys.stderr, flush=True)
    return {
        "shapes": shapes, "layers": layers, "dtype": dtype, "context": context, "device": str(device),
        "ms_per_pass": {k: 1e3 * s for k, s in per_k.items()},
        "per_token_ratio": {k: (s / k) / per_k[1] for k, s in per_k.items()},
        "grid_32": predicted_grid_times(per_k),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    a = sub.add_parser("scores", help="(a) checker score vs forward passes on the demo model")
    a.add_argument("--count", type=int, default=24, help="captions of each set per size")
    a.add_argument("--seeds", default="0,1")
    a.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES))
    a.add_argument("--configs", help="comma-separated subset of " + ",".join(configurations(2)))
    a.add_argument("--floor", type=int, help="head_steps_floor of the annealed runs (default steps // 3)")
    a.add_argument("--batch", type=int, default=12)
    c = sub.add_parser("smoke", help="the demo model at 256x256 with w = 1, 2, 4: runs, passes as predicted")
    c.add_argument("--size", type=int, default=256)
    d = sub.add_parser("picture", help="a picture grid: captions x (sequential, w 1-4, annealed), same seed")
    d.add_argument("--path", default="docs/images/parallel_windows.png")
    d.add_argument("--count", type=int, default=4)
    e = sub.add_parser("walltime", help="(c) seconds per 128x128 demo image, sequential vs each w, interleaved")
    e.add_argument("--repeats", type=int, default=5)
    e.add_argument("--count", type=int, default=4, help="captions per configuration and repeat")
    b = sub.add_parser("passes", help="(b) decoder pass time vs tokens per pass at the 14B layer shapes")
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--small", action="store_true", help="tiny shapes (a check of the script)")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    b.add_argument("--context", type=int, default=1088, help="filled slots before the pass (prompt + image)")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--device", default="cpu")
    for p in (a, b, c, d, e):
        p.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.part == "scores":
        from nextstep_core import DEMO_MODEL, NextStepPipeline

        pipe = NextStepPipeline.from_folder(DEMO_MODEL)
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        report = scores(pipe, count=args.count, seeds=[int(s) for s in args.seeds.split(",")], sizes=sizes,
                        floor=args.floor, batch=args.batch, configs=args.configs.split(",") if args.configs else None)
    elif args.part == "picture":
        from nextstep_core import DEMO_MODEL, NextStepPipeline

        report = picture(NextStepPipeline.from_folder(DEMO_MODEL), args.path, count=args.count)
    elif args.part == "smoke":
        from nextstep_core import DEMO_MODEL, NextStepPipeline

        report = {"smoke": smoke(NextStepPipeline.from_folder(DEMO_MODEL), args.size)}
    elif args.part == "walltime":
        from nextstep_core import DEMO_MODEL, NextStepPipeline

        report = walltime(NextStepPipeline.from_folder(DEMO_MODEL), repeats=args.repeats, count=args.count)
    else:
        report = passes(layers=args.layers, small=args.small, dtype=args.dtype, context=args.context,
                        repeats=args.repeats, device=args.device)
    report.update(command=" ".join(["benchmarks/parallel_decoding.py", *(argv or sys.argv[1:])]),
                  date=datetime.date.today().isoformat(), seconds=round(time.perf_counter() - started, 1))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
