"""Every GPU check of NextStep in one prepared script: correctness on the device, fp8 quality,
and speed and memory at the real 14B shapes. Writes JSON after every part. From the repo root:

    python benchmarks/gpu_check.py --out benchmarks/gpu_check.json      # the device machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json  # the same code, CPU, tiny

Needs a CUDA build of torch and about 35 GB of free GPU memory (the bf16 14B configurations);
designed to finish within 7 minutes on an H100/H200-class card, CUDA-graph capture included
(`--budget-seconds` skips speed configurations that would start too late). The dry run writes
the same keys and is a test (tests/test_gpu_check.py). `--help` lists the options; the keys of
the JSON, what each measures, and the time budget: benchmarks/README.md, "GPU check".
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

STARTED = time.perf_counter()  # the clock of --budget-seconds and seconds.total: from before torch's import

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_14b  # noqa: E402
import gpu_check_authors  # noqa: E402 - the authors' pipeline on this machine's CPU (issue 25)
import gpu_check_comfy  # noqa: E402
import gpu_check_parallel  # noqa: E402 - next-set decoding's part (issue 25)
from gpu_check_tools import CaptureFailures, Window, error_text, free_memory, max_abs  # noqa: E402
from memory import write_shapes_only  # noqa: E402

from nextstep_core import DEMO_MODEL  # noqa: E402
from nextstep_core.demo.evaluate import evaluate  # noqa: E402
from nextstep_core.demo.tiny import write_tiny_model  # noqa: E402
from nextstep_core.engine.checkpoint import inspect_model_folder  # noqa: E402
from nextstep_core.engine.precision import fp8_matmul_available, parse_precision  # noqa: E402
from nextstep_core.memory.offload import enable_block_swap  # noqa: E402
from nextstep_core.memory.plan import GIB, Request, choose_plan  # noqa: E402
from nextstep_core.pipeline import GenerationInterrupted, NextStepPipeline  # noqa: E402
from nextstep_core.sampling.graphs import graph_mode  # noqa: E402

PARTS = ("bandwidth", "tiny", "captions", "shapes", "comfy", "parallel", "authors_cpu")
CONFIGS = {  # name -> (precision, sampler, steps, block swap from the planner)
    "bf16_sde28": ("bf16", "sde", 28, False),
    "bf16_dpm2m8": ("bf16", "dpm2m", 8, False),
    "fp8_dpm2m8": ("fp8_e4m3fn", "dpm2m", 8, False),
    "fp8_swap_dpm2m8": ("fp8_e4m3fn", "dpm2m", 8, True),
}
IMAGE = 512  # pixels a side: 32 x 32 = 1,024 tokens
TINY_SIZE = 64
PLAN_BUDGET_GIB = 12
WARM_TOKENS = 3  # token 0 (from the prefill), token 1 (the graph capture), token 2 (the first replay)
GRAPH_LOGGER = "nextstep_core.sampling.graphs"


class Check:
    """The run: options, the report, its file, the clock and the log."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else args.device)
        self.cuda = self.device.type == "cuda"
        self.started = STARTED
        self.out = Path(args.out)
        self.report: dict = {
            "script": "benchmarks/gpu_check.py", "dry_run": self.dry, "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability(self.device)) if self.cuda else None,
            "read_bandwidth_gb_s": None, "correctness": {}, "shapes_14b": {}, "seconds": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[{stamp} +{self.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)

    def write(self) -> None:
        self.report["seconds"]["total"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=2) + "\n")

    def guarded(self, where: dict, key: str, fn) -> None:
        """where[key] = fn(), or {"error": ...} if it raises; timed into seconds; the JSON rewritten."""
        started = time.perf_counter()
        self.log(f"{key} ...")
        try:
            where[key] = fn()
        except Exception as exc:  # noqa: BLE001 - one failing check must not lose the others
            where[key] = {"error": error_text(exc)}
            self.log(f"{key} FAILED: {error_text(exc)}")
            traceback.print_exc()
        finally:
            free_memory()
        self.report["seconds"][key] = round(time.perf_counter() - started, 2)
        self.log(f"{key} done in {self.report['seconds'][key]:.1f}s: {json.dumps(where[key])[:400]}")
        self.write()

    # --- parts -------------------------------------------------------------------------------

    def bandwidth(self) -> float:
        gib, repeats = (4.0, 10) if self.cuda else (0.125, 3)
        return gpu_14b.read_bandwidth(self.device, gib=gib, repeats=repeats) / 1e9

    def tiny(self) -> None:
        c = self.report["correctness"]
        with tempfile.TemporaryDirectory() as workdir:
            folder = write_tiny_model(workdir, version="1.1", seed=3)
            request = dict(width=TINY_SIZE, height=TINY_SIZE, seed=5)
            gpu = NextStepPipeline.from_folder(folder, precision="float32", device=self.device)

            def gpu_vs_cpu():
                cpu = NextStepPipeline.from_folder(folder, precision="float32", device="cpu")
                a = cpu.generate(gpu_14b.PROMPT, graph="off", **request)
                b = gpu.generate(gpu_14b.PROMPT, graph="off", **request)
                c["gpu_vs_cpu_float32_images_max_abs"] = max_abs(a.images, b.images)
                return max_abs(a.tokens, b.tokens)

            def graph_vs_eager():
                c["graph_mode"] = graph_mode("on", self.device, block_swap=False, compile=False)
                eager = gpu.generate(gpu_14b.PROMPT, graph="off", exact=False, **request).tokens
                graphed = gpu.generate(gpu_14b.PROMPT, graph="on", exact=False, **request).tokens
                c["graph_max_abs"] = max_abs(eager, graphed)
                return bool(torch.equal(eager, graphed))

            def swap_vs_no_swap():
                c["swap_block_swap"] = 1
                swapped = NextStepPipeline.from_folder(folder, precision="float32", device=self.device, block_swap=1)
                plain = gpu.generate(gpu_14b.PROMPT, graph="off", **request)
                other = swapped.generate(gpu_14b.PROMPT, graph="off", **request)
                c["swap_max_abs"] = max_abs(plain.tokens, other.tokens)
                return bool(torch.equal(plain.tokens, other.tokens) and torch.equal(plain.images, other.images))

            self.guarded(c, "gpu_vs_cpu_float32_max_abs", gpu_vs_cpu)
            self.guarded(c, "graph_equals_eager", graph_vs_eager)
            self.guarded(c, "swap_equals_no_swap", swap_vs_no_swap)

    def captions(self) -> dict:
        count, batch = self.args.captions, self.args.caption_batch
        scores: dict = {"captions": count, "batch": batch, "fp8_matmul_available": fp8_matmul_available(self.device)}
        variants = {"bf16": "bf16", "fp8_e4m3fn": "fp8_e4m3fn",
                    "fp8_e4m3fn_scaled_mm": parse_precision("fp8_e4m3fn", fp8_matmul=True)}
        for name, precision in variants.items():
            started = time.perf_counter()
            try:
                pipe = NextStepPipeline.from_folder(DEMO_MODEL, precision=precision, device=self.device)
                result = evaluate(pipe, captions=count, edits=0, batch=batch)
                scores[name] = result["caption_score"]
                del pipe, result
            except Exception as exc:  # noqa: BLE001
                scores[name] = {"error": error_text(exc)}
                traceback.print_exc()
            free_memory()
            self.log(f"caption score {name}: {scores[name]} ({time.perf_counter() - started:.1f}s)")
        for name in ("fp8_e4m3fn", "fp8_e4m3fn_scaled_mm"):
            if isinstance(scores.get(name), float) and isinstance(scores.get("bf16"), float):
                scores[f"difference_{name}_minus_bf16"] = scores[name] - scores["bf16"]
        scores["difference"] = scores.get("difference_fp8_e4m3fn_minus_bf16")
        return scores

    # --- the 14B shapes ----------------------------------------------------------------------

    def plan(self) -> dict:
        """The planner's fp8 choice for a 12 GiB budget at 512x512 on the 14B shapes (headers only)."""
        with tempfile.TemporaryDirectory() as workdir:
            files = inspect_model_folder(write_shapes_only(Path(workdir)))
            plan = choose_plan(files, PLAN_BUDGET_GIB * GIB, Request(width=IMAGE, height=IMAGE),
                               precision="fp8_e4m3fn")
        return {"free_gib": PLAN_BUDGET_GIB, "precision": plan.precision, "block_swap": plan.block_swap,
                "layers": plan.layers, "estimated_peak_gb": plan.total / 1e9, "describe": plan.describe()}

    def shapes(self) -> None:
        s = self.report["shapes_14b"]
        shape_name = "small" if self.dry else "14b"
        s.update(shapes=shape_name, image=f"{IMAGE}x{IMAGE}", tokens_per_image=(IMAGE // 16) ** 2,
                 warm_tokens=WARM_TOKENS, vae_decode_pixels=self.args.vae_pixels,
                 method="ms_per_token: generate(graph='auto' on CUDA; 'on' = recorded replay in the dry run, "
                        "'auto' with block swap), no timers, synchronised only at the window's two ends, "
                        f"tokens {WARM_TOKENS}..{WARM_TOKENS}+tokens_measured of a {IMAGE}x{IMAGE} image (static KV "
                        "cache for all 1,024 tokens), stopped by the progress callback and extrapolated to 1,024 "
                        "tokens. decode/head: a separate eager pass (graph='off', DynamicCache) with synchronising "
                        "timers around each backbone call; head = the rest of that loop.")
        self.guarded(s, "plan", self.plan)
        planned = s["plan"].get("block_swap") if isinstance(s["plan"], dict) else None
        torch.manual_seed(0)
        holder: dict = {}

        def build():
            with tempfile.TemporaryDirectory() as workdir:
                holder["pipe"] = gpu_14b.build_pipeline(gpu_14b.SHAPES[shape_name], self.device, torch.bfloat16,
                                                        Path(workdir))
            pipe = holder["pipe"]
            holder["timers"] = gpu_14b.Timers(pipe)
            gpu_14b.synchronize(self.device)
            return {"decoder_weight_gb": gpu_14b.decoder_layer_bytes(pipe) / 1e9,
                    "model_gb": gpu_14b.module_bytes(pipe.model) / 1e9, "cfg": pipe.version.cfg,
                    "free_gb_after_build": torch.cuda.mem_get_info(self.device)[0] / 1e9 if self.cuda else None}

        self.guarded(s, "build", build)
        if "pipe" not in holder:
            return
        reserve = 2 * self.args.pass_seconds + 10
        state = {"precision": "bf16", "swap": 0}
        for name in self.args.configs:
            precision, sampler, steps, swap = CONFIGS[name]
            left = self.args.budget_seconds - self.elapsed()
            if left < reserve:
                s[name] = {"skipped": f"over budget: {left:.0f}s of --budget-seconds left, a configuration may "
                                      f"take {reserve:.0f}s"}
                self.log(f"{name}: skipped ({s[name]['skipped']})")
                self.write()
                continue
            swap_count = None
            if swap:
                if planned is None:
                    s[name] = {"error": "no block swap count: the planner part failed"}
                    self.write()
                    continue
                layers = len(holder["pipe"].model.backbone.layers)
                swap_count = min(planned, layers - 1)  # the dry run's small shapes have 2 layers
            measure = functools.partial(self.run_config, holder, state, precision, sampler, steps, swap_count)
            self.guarded(s, name, measure)
            if swap_count and isinstance(s[name], dict):
                s[name].update(planned_block_swap=planned, block_swap=swap_count)
                self.write()
        holder.clear()
        free_memory()

    def run_config(self, holder: dict, state: dict, precision: str, sampler: str, steps: int,
                   swap_count: int | None) -> dict:
        pipe, timers = holder["pipe"], holder["timers"]
        if precision != state["precision"]:  # in place, once: bf16 -> fp8 e4m3fn storage (bf16 products)
            if state["swap"]:
                raise RuntimeError("cannot convert a block-swapped model")
            started = time.perf_counter()
            gpu_14b.convert_to_fp8(pipe, fp8_matmul=False)
            state["precision"] = precision
            free_memory()
            self.report["seconds"]["fp8_conversion"] = round(time.perf_counter() - started, 2)
        swap_check = None
        if (swap_count or 0) != state["swap"]:
            # 4 tokens (32x32) eagerly without and with the swap: the same bits are expected
            small = dict(width=32, height=32, seed=1, sampler=sampler, steps=steps, graph="off", decode=False)
            plain = pipe.generate(gpu_14b.PROMPT, **small).tokens
            started = time.perf_counter()
            enable_block_swap(pipe.model, swap_count or 0)
            state["swap"] = swap_count or 0
            free_memory()
            self.report["seconds"]["block_swap_setup"] = round(time.perf_counter() - started, 2)
            swapped_tokens = pipe.generate(gpu_14b.PROMPT, **small).tokens
            swap_check = {"tokens_equal_to_no_swap_32px": bool(torch.equal(plain, swapped_tokens)),
                          "max_abs_to_no_swap_32px": max_abs(plain, swapped_tokens)}
            del plain, swapped_tokens
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        swapped = bool(state["swap"])
        option = "on" if not self.cuda and not swapped else "auto"
        mode = graph_mode(option, self.device, block_swap=swapped, compile=False)
        options = dict(width=IMAGE, height=IMAGE, seed=1, sampler=sampler, steps=steps, decode=False)

        # 1. the whole loop, no timers (graphed where the default graphs it)
        failures = CaptureFailures()
        logging.getLogger(GRAPH_LOGGER).addHandler(failures)
        timers.enabled = False
        window = Window(self.device, WARM_TOKENS, self.args.tokens, self.args.pass_seconds)
        try:
            pipe.generate(gpu_14b.PROMPT, graph=option, callback=window, **options)
        except GenerationInterrupted:
            pass
        finally:
            logging.getLogger(GRAPH_LOGGER).removeHandler(failures)
            timers.enabled = True
        if window.t1 is None:
            raise RuntimeError("the graphed pass ended before its measured window")
        ms_per_token = 1e3 * window.seconds / window.measured
        first_tokens = window.t0 - window.called

        # 2. the eager pass with synchronising timers: decode vs head
        timers.reset()
        split = Window(self.device, WARM_TOKENS, self.args.split_tokens, self.args.pass_seconds, timers)
        try:
            pipe.generate(gpu_14b.PROMPT, graph="off", callback=split, **options)
        except GenerationInterrupted:
            pass
        if split.t1 is None:
            raise RuntimeError("the timed pass ended before its measured window")
        decode = split.split["decode"]

        # 3. one VAE decode of random latents at the image size (after a warm-up)
        timers.enabled = False
        try:
            side = self.args.vae_pixels // pipe.image_tokenizer.config.downsample
            latents = torch.randn(1, pipe.image_tokenizer.config.z_channels, side, side,
                                  generator=torch.Generator().manual_seed(0)).to(self.device, pipe.dtype)
            with torch.no_grad():
                pipe.image_tokenizer.decode(latents)
                gpu_14b.synchronize(self.device)
                started = time.perf_counter()
                pipe.image_tokenizer.decode(latents)
                gpu_14b.synchronize(self.device)
            vae_seconds = time.perf_counter() - started
        finally:
            timers.enabled = True
        tokens = (IMAGE // 16) ** 2
        return {**(swap_check or {}),
            "precision": precision, "sampler": sampler, "steps": steps, "graph_mode": mode,
            "graph": mode is not None and failures.count == 0,
            "ms_per_token": ms_per_token, "tokens_measured": window.measured,
            "decode_ms_per_token": 1e3 * decode / split.measured,
            "head_ms_per_token": 1e3 * (split.seconds - decode) / split.measured,
            "eager_ms_per_token": 1e3 * split.seconds / split.measured,
            "split_tokens_measured": split.measured,
            "prefill_seconds": split.prefill, "vae_decode_seconds": vae_seconds,
            "image_512_seconds": ms_per_token * tokens / 1e3 + split.prefill + vae_seconds,
            "first_tokens_seconds": first_tokens,
            "peak_vram_gb": torch.cuda.max_memory_allocated(self.device) / 1e9 if self.cuda else None,
            "extrapolated": f"{window.measured} of {tokens} tokens measured; ms_per_token x {tokens}",
        }

    def run(self) -> dict:
        parts = self.args.parts
        self.log(f"device {self.report['device']}, torch {torch.__version__}, parts {','.join(parts)}, "
                 f"out {self.out}")
        self.write()
        guarded, report, device, dry = self.guarded, self.report, self.device, self.dry
        steps = {"bandwidth": lambda: guarded(report, "read_bandwidth_gb_s", self.bandwidth), "tiny": self.tiny,
                 "captions": lambda: guarded(report["correctness"], "fp8_vs_bf16_caption_score", self.captions),
                 "shapes": self.shapes, "comfy": lambda: guarded(report, "comfy", lambda: gpu_check_comfy.check(dry)),
                 "parallel": lambda: guarded(report, "parallel_decoding",
                                             lambda: gpu_check_parallel.measure(device, dry)),
                 "authors_cpu": lambda: guarded(report, "authors_cpu",
                                                lambda: gpu_check_authors.check(self.out, dry, self.elapsed()))}
        for part in (p for p in PARTS if p in parts):  # in PARTS' order: authors_cpu last, on what is left
            started = time.perf_counter()
            try:
                steps[part]()
            except Exception as exc:  # noqa: BLE001 - e.g. the tiny model could not be written or loaded
                self.report["correctness" if part == "tiny" else "shapes_14b"][f"{part}_error"] = error_text(exc)
                traceback.print_exc()
            free_memory()
            self.report["seconds"][f"part_{part}"] = round(time.perf_counter() - started, 2)
            self.write()
        self.log(f"all done in {self.elapsed():.1f}s -> {self.out}")
        return self.report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code on the CPU at tiny shapes (gpu_14b's 'small'), with small counts")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--budget-seconds", type=float, help="skip speed configurations once past this (default 360)")
    parser.add_argument("--tokens", type=int, help="tokens per graphed measurement (default 128; dry run 12)")
    parser.add_argument("--split-tokens", type=int, help="tokens per eager timed measurement (default 64; dry run 6)")
    parser.add_argument("--pass-seconds", type=float, help="cap on one measured window (default 20)")
    parser.add_argument("--captions", type=int, help="held-out captions per precision (default 100; dry run 4)")
    parser.add_argument("--caption-batch", type=int, help="captions per generate call (default 50; dry run 4)")
    parser.add_argument("--vae-pixels", type=int, help="VAE decode size (default 512; dry run 64)")
    args = parser.parse_args(argv)
    defaults = (dict(budget_seconds=240, tokens=12, split_tokens=6, pass_seconds=10, captions=4, caption_batch=4,
                     vae_pixels=64) if args.dry_run else
                dict(budget_seconds=360, tokens=128, split_tokens=64, pass_seconds=20, captions=100, caption_batch=50,
                     vae_pixels=IMAGE))
    for key in [k for k in defaults if getattr(args, k) is None]:
        setattr(args, key, defaults[key])
    args.parts = [p for p in args.parts.split(",") if p]
    args.configs = [c for c in args.configs.split(",") if c]
    for name, allowed in (("parts", PARTS), ("configs", CONFIGS)):
        unknown = [x for x in getattr(args, name) if x not in allowed]
        if unknown:
            parser.error(f"unknown {name}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    if not args.dry_run and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: this torch has no CUDA or sees no GPU (use --dry-run to check the script)")
    return args


def main(argv: list[str] | None = None) -> int:
    Check(parse_args(argv)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
