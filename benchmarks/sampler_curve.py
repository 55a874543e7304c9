"""Quality against cost for every sampler on the demo model (or any model folder).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/sampler_curve.py --captions 100

For each sampler and step count: the prompt-following score (nextstep_core/evaluate.py's
checker, caption score x 100, the same held-out captions and seeds for every sampler), and a
distance to the default sampler's output distribution: the sliced Wasserstein-1 distance
(x 100) between the images (8x8 RGB thumbnails in [0, 1], 64 fixed random directions) and the
default sampler's images. `default (seed +1000)` runs the default sampler with other seeds, so
its distance is the floor that sampling noise alone gives. Writes benchmarks/sampler_curve.json
and .png and prints a markdown table. The figures belong to the model version measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pil_plot import Panel, plot_panels  # noqa: E402

from nextstep_core.demo.evaluate import evaluate  # noqa: E402
from nextstep_core.pipeline import NextStepPipeline  # noqa: E402
from nextstep_core.sampling.samplers import head_evaluations  # noqa: E402

DEFAULT_CONFIGS = ["sde:8", "sde:14", "ode:8", "ode:16", "ode:28", "heun:2", "heun:4", "midpoint:2", "midpoint:4",
                   "dpm2m:4", "dpm2m:8", "dpm2m:12", "dpm2m_sde:4", "dpm2m_sde:8"]
SEED_OFFSET = 1000


def thumbnails(images) -> np.ndarray:
    """PIL images -> (n, 8*8*3) float features in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB").resize((8, 8), resample=2), dtype=np.float32).reshape(-1) / 255
                     for im in images])


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, directions: int = 64, seed: int = 0) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance of the projections."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(a.shape[1], directions))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
    quantiles = np.linspace(0, 1, max(len(pa), len(pb)))
    qa = np.stack([np.interp(quantiles, np.linspace(0, 1, len(pa)), pa[:, d]) for d in range(directions)], 1)
    qb = np.stack([np.interp(quantiles, np.linspace(0, 1, len(pb)), pb[:, d]) for d in range(directions)], 1)
    return float(np.abs(qa - qb).mean())


def run_config(pipe, label: str, sampler: str, steps: int | None, captions: int, edits: int, seed: int) -> dict:
    sampling = {"sampler": sampler} | ({} if steps is None else {"steps": steps})
    settings = pipe.sampler_settings(sampler, steps)
    started = time.perf_counter()
    report = evaluate(pipe, captions=captions, edits=edits, seed=seed, **sampling)
    row = {"label": label, "sampler": settings.name, "steps": settings.steps,
           "head_evaluations": head_evaluations(settings), "caption_score": 100 * report["caption_score"],
           "edit_score": None if report["edit_score"] is None else 100 * report["edit_score"],
           "seconds": round(time.perf_counter() - started, 1)}
    row["_features"] = thumbnails(report["_samples"])
    print(f"{label:>22}: {row['head_evaluations']:>3} evals, score {row['caption_score']:.1f} ({row['seconds']} s)",
          file=sys.stderr, flush=True)
    return row


def markdown_table(rows: list[dict], model: str, captions: int) -> str:
    lines = [f"Model: `{model}`, {captions} held-out captions (64x64), seeds as evaluate.py.", "",
             "| sampler | steps | head evals / token | caption score | distance to default |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['steps']} | {r['head_evaluations']} | {r['caption_score']:.1f} | "
                     f"{r['distance']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    default, floor = rows[0], rows[1]
    series_score: dict[str, list] = {}
    series_distance: dict[str, list] = {}
    for r in rows[2:]:
        series_score.setdefault(r["sampler"], []).append((r["head_evaluations"], r["caption_score"]))
        series_distance.setdefault(r["sampler"], []).append((r["head_evaluations"], r["distance"]))
    name = f"default {default['sampler']} {default['steps']}"
    x_label = "head evaluations per token"
    plot_panels(str(path), [
        Panel("Prompt-following (checker caption score x100) vs head evaluations per token", x_label,
              "score", series_score, hlines={name: default["caption_score"]}),
        Panel("Distance to the default sampler's images (sliced W1 x100; lower is closer)", x_label,
              "distance", series_distance, hlines={"default, other seeds": floor["distance"]}),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "nextstep_core" / "demo_model"))
    parser.add_argument("--captions", type=int, default=100)
    parser.add_argument("--edits", type=int, default=0)
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="sampler:steps entries")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "sampler_curve"), help="path without suffix")
    args = parser.parse_args(argv)
    pipe = NextStepPipeline.from_folder(args.model)
    rows = [run_config(pipe, "default (auto)", "auto", None, args.captions, args.edits, 0),
            run_config(pipe, f"default (seed +{SEED_OFFSET})", "auto", None, args.captions, args.edits, SEED_OFFSET)]
    for entry in args.configs:
        sampler, _, steps = entry.partition(":")
        rows.append(run_config(pipe, entry, sampler, int(steps) if steps else None, args.captions, args.edits, 0))
    reference = rows[0]["_features"]
    for r in rows:
        r["distance"] = 100 * sliced_wasserstein(r.pop("_features"), reference)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "captions": args.captions, "rows": rows},
                                                   indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(markdown_table(rows, Path(args.model).name, args.captions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
