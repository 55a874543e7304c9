"""Generation speed: the fast token loop against the contract's reference loop, same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py              # every config
    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --configs tiny-1.0
    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --kernels      # product kernels' read rates only
    NEXTSTEP_CPU_KERNEL=columns python benchmarks/speed.py ...         # every timed product with one kernel

Each config runs in its own process (so peak RSS is its own). Implementations, interleaved
and repeated, the fastest repeat kept (the machine is shared and noisy: read the ratios):
- reference: generate(loop="reference"), the contract line by line (reference_loop.py);
- fast: the default loop (decode.py), bit-identical to the reference on CPU;
- fast-batched: generate(exact=False): AdaLN modulations of all steps in one product per token,
  and on CPU (float32) each large weight's product kernel chosen by timing it once per shape
  (head.fast_product, engine/kernels.py); each config's `kernels` records the choices per shape.
Per token: backbone prefill (once per image, shown per image) and decode (per token), head
(everything in the loop that is not the backbone: head evaluations, guidance, sampler), and
the VAE decode per image. For the real-head config, one head evaluation is compared with the
machine's floor: the head's weight bytes / the memory read bandwidth measured here (a float32
sum); also given: the weight bytes each implementation reads per evaluation and the rate it
reads them at, and the rate at which F.linear and head.fast_product alone read every head
weight once with 2 rows (a matmul-style read, for comparison with the sum).
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nextstep_core.demo.tiny import TinySpec, write_tiny_model  # noqa: E402
from nextstep_core.engine.head import ONEDNN, FlowNet, column_linear, exact_product, fast_product, onednn_linear  # noqa: E402
from nextstep_core.engine.kernels import ENV, describe, kernel_choices, shape_key  # noqa: E402
from nextstep_core.pipeline import NextStepPipeline  # noqa: E402
from nextstep_core.sampling.samplers import head_evaluations  # noqa: E402

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


def weight_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def bytes_read_per_evaluation(net: FlowNet, evaluations: int) -> dict[str, float]:
    """Head weight bytes each implementation reads per evaluation: the reference reads all of
    them; fast reads the time embedding once per generation and the condition embedding once
    per token; fast-batched also reads the AdaLN modulation weights once per token."""
    modulation = weight_bytes([b.adaLN_modulation for b in net.res_blocks] + [net.final_layer.adaLN_modulation])
    per_step = weight_bytes([net.input_proj, net.final_layer.linear] + [b.in_ln for b in net.res_blocks]
                            + [b.mlp for b in net.res_blocks])
    per_token = weight_bytes([net.cond_embed])
    return {"reference": weight_bytes([net]), "fast": per_step + modulation + per_token / evaluations,
            "fast-batched": per_step + (modulation + per_token) / evaluations}


def product_read_rates(net: FlowNet, rows: int = 2, repeats: int = 7) -> dict[str, float]:
    """GB/s at which each product kernel reads the head's weights: every nn.Linear of the net
    applied once to `rows` random rows (F.linear vs head.fast_product), interleaved, best of repeats."""
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, linear.in_features) for linear in linears]
    kernels = {"F.linear": [exact_product(linear) for linear in linears],
               "fast_product": [fast_product(linear, rows) for linear in linears]}
    best = dict.fromkeys(kernels, float("inf"))
    with torch.no_grad():
        for _ in range(repeats):
            for name, products in kernels.items():
                started = time.perf_counter()
                for product, x in zip(products, inputs):
                    product(x)
                best[name] = min(best[name], time.perf_counter() - started)
    return {name: weight_bytes(linears) / seconds / 1e9 for name, seconds in best.items()}


# product kernels for x (rows, in) and weight (out, in): fn(x, weight, bias, weight_t (in, out) contiguous)
KERNELS = {
    "F.linear": lambda x, w, b, wt: F.linear(x, w, b),
    "addmm(b, x, weight_t)": lambda x, w, b, wt: torch.addmm(b, x, wt),
    "mv per row": lambda x, w, b, wt: torch.stack([torch.addmv(b, w, row) for row in x]),
    "column_linear": lambda x, w, b, wt: column_linear(x, w, b[:, None]),
    **({"oneDNN": lambda x, w, b, wt: onednn_linear(x, w, b)} if ONEDNN else {}),
}


def kernel_read_rates(out_features: int, rows: int, megabytes: int = 300, repeats: int = 5) -> dict[str, float]:
    """GB/s at which each of KERNELS reads (out_features, 1536) float32 weights with `rows` rows:
    distinct weights totalling ~`megabytes` (beyond the caches), interleaved, best of repeats."""
    count = max(1, megabytes * 2**20 // (out_features * 1536 * 4))
    weights = [torch.randn(out_features, 1536) * 0.02 for _ in range(count)]
    transposed = [w.t().contiguous() for w in weights]
    bias, x = torch.randn(out_features), torch.randn(rows, 1536)
    best = dict.fromkeys(KERNELS, float("inf"))
    for _ in range(repeats):
        for name, kernel in KERNELS.items():
            started = time.perf_counter()
            for w, wt in zip(weights, transposed):
                kernel(x, w, bias, wt)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: count * out_features * 1536 * 4 / seconds / 1e9 for name, seconds in best.items()}


def kernel_record() -> dict:
    """The product kernels this process's head.fast_product used, per shape (kernels.kernel_choices),
    and NEXTSTEP_CPU_KERNEL's value (None when unset)."""
    return {"override": os.environ.get(ENV) or None, "choices": kernel_choices()}


def kernel_lines(result: dict) -> list[str]:
    """One line naming the kernel chosen for each shape in a config's result (none if no product was timed)."""
    choices = result["kernels"]["choices"]
    if not choices:
        return []
    return [f"Product kernels chosen ({result['config']}): "
            + "; ".join(f"{shape}: {name}" for shape, name in choices.items()) + "."]


def kernel_table() -> str:
    """Markdown: read rate of every kernel for the head's weight shapes and a range of row counts,
    with 2 and 1 threads, against the float32 sum's read bandwidth; `chosen`: head.fast_product's
    kernel for the shape (timed by it, or NEXTSTEP_CPU_KERNEL's)."""
    threads = torch.get_num_threads()
    lines = ["| threads | weight | rows | sum GB/s | " + " | ".join(KERNELS) + " | chosen |",
             "|---:|---|---:|---:|" + "---:|" * len(KERNELS) + "---|"]
    for count in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(count)
        bandwidth = read_bandwidth() / 1e9
        for out_features, rows in [(1536, 1), (1536, 2), (1536, 4), (1536, 8), (4608, 2), (4608, 20)]:
            rates = kernel_read_rates(out_features, rows)
            linear = torch.nn.Linear(1536, out_features)
            fast_product(linear, rows)
            chosen = kernel_choices()[describe(shape_key(linear.weight, rows))]
            lines.append(f"| {count} | {out_features}x1536 | {rows} | {bandwidth:.1f} | "
                         + " | ".join(f"{rates[name]:.1f}" for name in KERNELS) + f" | {chosen} |")
    torch.set_num_threads(threads)
    return "\n".join(lines)


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
        net = pipe.model.image_head.net
        out["read_bandwidth_gb_s"] = read_bandwidth() / 1e9
        out["floor_ms_per_evaluation"] = 1e3 * out["head_weight_bytes"] / (out["read_bandwidth_gb_s"] * 1e9)
        out["product_read_gb_s"] = product_read_rates(net)
        for impl, read in bytes_read_per_evaluation(net, out["head_evaluations"]).items():
            out["implementations"][impl]["head_bytes_per_evaluation"] = read
    out["kernels"] = kernel_record()
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
            rates = ", ".join(f"{name} {rate:.1f} GB/s" for name, rate in r["product_read_gb_s"].items())
            lines += ["", f"Real head: {r['head_weight_bytes'] / 1e6:.0f} MB of weights, read bandwidth "
                          f"{r['read_bandwidth_gb_s']:.1f} GB/s -> floor {r['floor_ms_per_evaluation']:.1f} ms per "
                          f"evaluation (all weights read once). Every head weight read once by 2-row products: "
                          f"{rates}.", "",
                      "| implementation | ms per head evaluation | floor / time | weight MB read per evaluation | "
                      "read rate GB/s |", "|---|---:|---:|---:|---:|"]
            for impl, m in r["implementations"].items():
                read = m["head_bytes_per_evaluation"]
                lines.append(f"| {impl} | {m['head_ms_per_evaluation']:.1f} | "
                             f"{r['floor_ms_per_evaluation'] / m['head_ms_per_evaluation']:.0%} | {read / 1e6:.0f} | "
                             f"{read / m['head_ms_per_evaluation'] / 1e6:.1f} |")
    chosen = [line for r in results for line in kernel_lines(r)]
    if chosen:
        lines += ["", *chosen]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure one config, print JSON
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "speed.json"))
    parser.add_argument("--kernels", action="store_true", help="only the product kernels' read rates (markdown)")
    args = parser.parse_args(argv)
    if args.kernels:
        with torch.no_grad():
            print(kernel_table())
        return 0
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
    summary = {"torch_threads": torch.get_num_threads(), "results": results}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
