"""Generation speed: the fast token loop against the contract's reference loop, same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py              # every config
    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --configs tiny-1.0

Each config runs in its own process (so peak RSS is its own). Implementations, interleaved
and repeated, the fastest repeat kept (the machine is shared and noisy: read the ratios):
- reference: generate(loop="reference"), the contract line by line (reference_loop.py);
- fast: the default loop (decode.py), bit-identical to the reference on CPU;
- fast-batched: generate(exact=False): AdaLN modulations of all steps in one product per token.
Per token: backbone prefill (once per image, shown per image) and decode (per token), head
(everything in the loop that is not the backbone: head evaluations, guidance, sampler), and
the VAE decode per image. For the real-head config, one head evaluation is compared with the
machine's floor: the head's weight bytes / the memory read bandwidth measured here.
Writes benchmarks/speed.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nextstep_core.pipeline import NextStepPipeline  # noqa: E402
from nextstep_core.sampling import head_evaluations  # noqa: E402
from nextstep_core.tiny import TinySpec, write_tiny_model  # noqa: E402

REAL_HEAD = TinySpec(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=512, head_dim=1536, head_layers=12, weight_dtype="bfloat16", shards=1)


@dataclass
class Config:
    """A model and a request: size in pixels (square), steps/cfg None = the model's defaults."""

    description: str
    version: str | None = None  # a tiny model in this layout; None: the demo model
    spec: TinySpec | None = None
    size: int = 64
    steps: int | None = 50
    cfg: float | None = 7.5
    num_images: int = 1
    repeats: int = 3
    kwargs: dict = field(default_factory=dict)


CONFIGS = {
    "tiny-1.0": Config("tiny test checkpoint, 1.0 layout (euler_maruyama), 64x64, 50 steps, cfg 7.5", "1.0"),
    "tiny-1.1": Config("tiny test checkpoint, 1.1 layout (sde), 64x64, 50 steps, cfg 7.5", "1.1"),
    "demo": Config("demo model (its defaults: sde 28 steps, cfg 3.0), 64x64, 4 images", None, steps=None, cfg=None,
                   num_images=4),
    "real-head": Config("2 backbone layers + the real head (dim 1536 x 12 layers, 64-dim tokens), 32x32, 10 steps, "
                        "cfg 7.5", "1.1", REAL_HEAD, size=32, steps=10, repeats=2),
}
IMPLEMENTATIONS = {"reference": {"loop": "reference"}, "fast": {}, "fast-batched": {"exact": False}}


class Timers:
    """Wraps the backbone's forward (prefill = more than one position, else decode) and the
    image tokenizer's decode with accumulating wall-clock timers."""

    def __init__(self, pipe: NextStepPipeline):
        self.totals = {"prefill": 0.0, "decode": 0.0, "vae": 0.0}
        backbone, vae = pipe.model.backbone, pipe.image_tokenizer
        self.wrap(backbone, "forward", lambda *a, **k: "prefill" if k["inputs_embeds"].shape[1] > 1 else "decode")
        self.wrap(vae, "decode", lambda *a, **k: "vae")

    def wrap(self, obj, name: str, kind) -> None:
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[kind(*args, **kwargs)] += time.perf_counter() - started

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Best-of memory read bandwidth (bytes/s) of a float32 sum over a buffer larger than the caches."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best


def load(config: Config, workdir: Path) -> NextStepPipeline:
    if config.version is None:
        return NextStepPipeline.from_folder(ROOT / "nextstep_core" / "demo_model")
    return NextStepPipeline.from_folder(write_tiny_model(workdir, version=config.version, spec=config.spec, seed=3))


def run_one(pipe, timers: Timers, config: Config, options: dict) -> dict:
    timers.reset()
    started = time.perf_counter()
    result = pipe.generate(["a red circle on a blue background"], width=config.size, height=config.size,
                           num_images=config.num_images, steps=config.steps, cfg=config.cfg, seed=1, **options)
    total = time.perf_counter() - started
    return {"total": total, **timers.totals, "tokens": result.tokens}


def measure_config(name: str) -> dict:
    config = CONFIGS[name]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        pipe = load(config, Path(workdir))
    timers = Timers(pipe)
    settings = pipe.sampler_settings("auto", config.steps)
    tokens = (config.size // pipe.pixels_per_token) ** 2
    best: dict[str, dict] = {}
    for _ in range(config.repeats + 1):  # the first round warms up
        for impl, options in IMPLEMENTATIONS.items():
            run = run_one(pipe, timers, config, options)
            if impl not in best or run["total"] < best[impl]["total"]:
                best[impl] = run
    reference_tokens = best["reference"].pop("tokens")
    out = {"config": name, "description": config.description, "tokens_per_image": tokens,
           "images": config.num_images, "head_evaluations": head_evaluations(settings), "sampler": settings.name,
           "head_weight_bytes": sum(p.numel() * p.element_size() for p in pipe.model.image_head.parameters()),
           "implementations": {}}
    for impl, run in best.items():
        generated = run.pop("tokens", reference_tokens)
        head = run["total"] - run["prefill"] - run["decode"] - run["vae"]
        images, all_tokens = config.num_images, config.num_images * tokens
        out["implementations"][impl] = {
            "seconds": run["total"],
            "prefill_ms_per_image": 1e3 * run["prefill"] / images,
            "decode_ms_per_token": 1e3 * run["decode"] / all_tokens,
            "head_ms_per_token": 1e3 * head / all_tokens,
            "head_ms_per_evaluation": 1e3 * head / (tokens * out["head_evaluations"]),
            "vae_ms_per_image": 1e3 * run["vae"] / images,
            "tokens_per_s": all_tokens / (run["total"] - run["vae"]),
            "images_per_s": images / run["total"],
            "max_abs_difference_to_reference": float((generated - reference_tokens).abs().max()),
        }
    if name == "real-head":
        out["read_bandwidth_gb_s"] = read_bandwidth() / 1e9
        out["floor_ms_per_evaluation"] = 1e3 * out["head_weight_bytes"] / (out["read_bandwidth_gb_s"] * 1e9)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def tables(results: list[dict]) -> str:
    lines = ["| config | implementation | tokens/s | images/s | speed-up | prefill ms/image | decode ms/token | "
             "head ms/token | head ms/eval | VAE ms/image | max diff to reference | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        base = r["implementations"]["reference"]["tokens_per_s"]
        for impl, m in r["implementations"].items():
            lines.append(f"| {r['config']} | {impl} | {m['tokens_per_s']:.1f} | {m['images_per_s']:.2f} | "
                         f"{m['tokens_per_s'] / base:.2f}x | {m['prefill_ms_per_image']:.1f} | "
                         f"{m['decode_ms_per_token']:.2f} | {m['head_ms_per_token']:.1f} | "
                         f"{m['head_ms_per_evaluation']:.3f} | {m['vae_ms_per_image']:.1f} | "
                         f"{m['max_abs_difference_to_reference']:.1e} | {r['peak_rss_mb']:.0f} |")
    for r in results:
        if "floor_ms_per_evaluation" in r:
            lines += ["", f"Real head: {r['head_weight_bytes'] / 1e6:.0f} MB of weights, read bandwidth "
                          f"{r['read_bandwidth_gb_s']:.1f} GB/s -> floor {r['floor_ms_per_evaluation']:.1f} ms per "
                          "evaluation (all weights read once).", "",
                      "| implementation | ms per head evaluation | floor / time |", "|---|---:|---:|"]
            for impl, m in r["implementations"].items():
                lines.append(f"| {impl} | {m['head_ms_per_evaluation']:.1f} | "
                             f"{r['floor_ms_per_evaluation'] / m['head_ms_per_evaluation']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure one config, print JSON
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "speed.json"))
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_config(args.one)))
        return 0
    results = []
    for name in args.configs:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        if child.returncode:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    Path(args.out).write_text(json.dumps({"torch_threads": torch.get_num_threads(), "results": results}, indent=2) + "\n")
    print(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
