"""NextStep at its real 14B shapes on a GPU (random bf16 weights): per-token backbone and head
time against the memory-bandwidth floor, for each token loop, plus fp8 storage and block swap.

    python benchmarks/gpu_14b.py --out benchmarks/gpu_14b.json        # needs a CUDA GPU, ~35 GB
    python benchmarks/gpu_14b.py --shapes small --device cpu           # the same code on tiny shapes

Shapes: NextStep-1.1 / NextStep-1-Large (Qwen2.5-14B decoder: hidden 5120, 48 layers, 40 query
and 8 key/value heads, MLP 13824, vocabulary 152064; flow head dim 1536 x 12 blocks; 64-number
tokens; Flux tokenizer ch 128, ch_mult 1,2,4,4). The weights are random: speed does not depend
on their values. The model is built directly on the device; nothing is written to disk.

Per token, with classifier-free guidance (2 rows), the default `sde` sampler at 28 steps:
- backbone decode: one position through the 48 layers (reads ~26.4 GB of bf16 weights);
- head: everything else in the token loop (28 head evaluations, guidance, sampler);
- floors: weight bytes / measured read bandwidth (a `sum` over a 4 GiB buffer).
Timers synchronise the device around each backbone call; the totals are also measured without
timers. Writes JSON and prints markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nextstep_core.demo.tiny import TinySpec, tiny_config_dict  # noqa: E402
from nextstep_core.demo.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402
from nextstep_core.engine.checkpoint import NEXTSTEP_1_1, NextStepConfig  # noqa: E402
from nextstep_core.engine.model import NextStepModel  # noqa: E402
from nextstep_core.engine.precision import Fp8Linear, fp8_linear_names, parse_precision, quantize_rows_into  # noqa: E402
from nextstep_core.engine.prompt import SpecialIds, load_tokenizer  # noqa: E402
from nextstep_core.engine.vae import ImageTokenizer  # noqa: E402
from nextstep_core.engine.vae_files import VaeConfig  # noqa: E402
from nextstep_core.memory.offload import disable_block_swap, enable_block_swap  # noqa: E402
from nextstep_core.pipeline import NextStepPipeline  # noqa: E402
from nextstep_core.sampling.samplers import head_evaluations  # noqa: E402

SHAPES = {
    "14b": dict(spec=TinySpec(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                              intermediate_size=13824, max_position_embeddings=32768, head_dim=1536, head_layers=12),
                vocab=152064, vae=dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2), size=128, big_size=256),
    "small": dict(spec=TinySpec(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=512, head_dim=128, head_layers=2),
                  vocab=1024, vae=dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1), size=32, big_size=64),
}
PROMPT = "a red circle on the left and a blue square at the bottom, on a white background"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pipeline(shapes: dict, device: torch.device, dtype: torch.dtype, workdir: Path) -> NextStepPipeline:
    """A NextStep-1.1-shaped pipeline with random weights, built on `device` in `dtype`."""
    tokenizer = load_tokenizer(write_tiny_tokenizer(workdir / "tokenizer"))
    special = vars(SpecialIds.from_tokenizer(tokenizer))
    config = NextStepConfig.from_dict(tiny_config_dict(shapes["spec"], shapes["vocab"], special, "1.1"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = NextStepModel(config, shapes["spec"].head_dim, shapes["spec"].head_layers).eval()
            vae_config = VaeConfig.from_dict({"resolution": 256, "z_channels": 16, **shapes["vae"]},
                                             nextstep_1_1_defaults=True)
            image_tokenizer = ImageTokenizer(vae_config).eval()
    finally:
        torch.set_default_dtype(previous)
    for p in model.image_head.parameters():  # the released init zeroes the head's output; keep it live
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    return NextStepPipeline(model, tokenizer, image_tokenizer, NEXTSTEP_1_1)


class Timers:
    """Accumulates synchronised wall time of the backbone's one-position calls and of the VAE
    decode while `enabled` (when off, the wrapped calls run as they are, without synchronising)."""

    def __init__(self, pipe: NextStepPipeline):
        self.device = pipe.device
        self.enabled = True
        self.totals = {"prefill": 0.0, "decode": 0.0, "vae": 0.0}
        self.wrap(pipe.model.backbone, "forward",
                  lambda *a, **k: "prefill" if k["inputs_embeds"].shape[1] > 1 else "decode")
        self.wrap(pipe.image_tokenizer, "decode", lambda *a, **k: "vae")

    def wrap(self, obj, name: str, kind) -> None:
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            if not self.enabled:
                return original(*args, **kwargs)
            synchronize(self.device)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.totals[kind(*args, **kwargs)] += time.perf_counter() - started

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)


def read_bandwidth(device: torch.device, gib: float = 4.0, repeats: int = 10) -> float:
    """Best-of read bandwidth (bytes/s): a bf16 sum over a buffer far larger than the caches."""
    buffer = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        buffer.sum(dtype=torch.float32)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    del buffer
    return int(gib * 2**30) / best


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def decoder_layer_bytes(pipe: NextStepPipeline) -> int:
    """Bytes a one-position decode step must read: every decoder layer and the final norm."""
    backbone = pipe.model.backbone
    return sum(module_bytes(layer) for layer in backbone.layers) + module_bytes(backbone.norm)


def generate_timed(pipe, timers: Timers, size: int, **options) -> dict:
    """One generation with the split timers, and one without (the true total, device work overlapping).
    head = the timed run's total minus its backbone and VAE time (its loop work, synchronised)."""
    timers.reset()
    timers.enabled = True
    synchronize(pipe.device)
    started = time.perf_counter()
    result = pipe.generate(PROMPT, width=size, height=size, seed=1, **options)
    timed_total = time.perf_counter() - started
    split = dict(timers.totals)
    timers.enabled = False
    synchronize(pipe.device)
    started = time.perf_counter()
    pipe.generate(PROMPT, width=size, height=size, seed=1, **options)
    synchronize(pipe.device)
    untimed = time.perf_counter() - started
    timers.enabled = True
    tokens = result.tokens.shape[1]
    head = timed_total - split["prefill"] - split["decode"] - split["vae"]
    return {"tokens": tokens, "seconds": untimed, "tokens_per_s": tokens / max(1e-9, untimed - split["vae"]),
            "prefill_ms": 1e3 * split["prefill"], "decode_ms_per_token": 1e3 * split["decode"] / max(1, tokens - 1),
            "head_ms_per_token": 1e3 * head / tokens, "vae_ms": 1e3 * split["vae"], "_tokens": result.tokens}


def time_head_evaluation(pipe: NextStepPipeline, rows: int = 2, repeats: int = 50, compiled: bool = False) -> float:
    """ms per evaluation of the flow head on `rows` rows (the net's own forward), in isolation."""
    net = pipe.model.image_head.net
    device, dtype = pipe.device, pipe.dtype
    x = torch.randn(rows, pipe.model.config.token_dim, device=device, dtype=dtype)
    t = torch.full((rows,), 0.5, device=device, dtype=dtype)
    condition = torch.randn(rows, pipe.model.config.hidden_size, device=device, dtype=dtype)
    step = torch.compile(net, mode="reduce-overhead") if compiled else net
    with torch.no_grad():
        for _ in range(5):
            step(x, t, condition)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            step(x, t, condition)
        synchronize(device)
    return 1e3 * (time.perf_counter() - started) / repeats


def convert_to_fp8(pipe: NextStepPipeline, fp8_matmul: bool) -> None:
    """Quantise the decoder's linears in place to fp8 e4m3fn with per-row scales (precision.py's format)."""
    precision = parse_precision("fp8_e4m3fn", fp8_matmul=fp8_matmul)
    for name in fp8_linear_names(pipe.model):
        parent_name, _, attr = name.rpartition(".")
        parent = pipe.model.get_submodule(parent_name)
        old = getattr(parent, attr)
        new = Fp8Linear(old.in_features, old.out_features, old.bias is not None, precision.dtype, fp8_matmul,
                        device=old.weight.device)
        quantize_rows_into(old.weight.data, new.weight.data, new.weight_scale.data, 0)
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data)
        setattr(parent, attr, new)


def set_fp8_matmul(pipe: NextStepPipeline, enabled: bool) -> None:
    for module in pipe.model.modules():
        if isinstance(module, Fp8Linear):
            module.fp8_matmul = enabled


def run(shape_name: str, device: torch.device, log) -> dict:
    shapes = SHAPES[shape_name]
    dtype = torch.bfloat16
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"shapes": shape_name, "device": device_name, "torch": torch.__version__}
    bandwidth = read_bandwidth(device, gib=4.0 if device.type == "cuda" else 0.5)
    report["read_bandwidth_gb_s"] = bandwidth / 1e9
    log(f"read bandwidth {bandwidth / 1e9:.0f} GB/s")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        pipe = build_pipeline(shapes, device, dtype, Path(workdir))
    synchronize(device)
    report["build_seconds"] = time.perf_counter() - started
    layer_bytes = decoder_layer_bytes(pipe)
    head_bytes = module_bytes(pipe.model.image_head)
    report.update(decoder_weight_gb=layer_bytes / 1e9, head_weight_mb=head_bytes / 1e6,
                  model_gb=module_bytes(pipe.model) / 1e9,
                  decode_floor_ms=1e3 * layer_bytes / bandwidth, head_floor_ms=1e3 * head_bytes / bandwidth)
    log(f"built in {report['build_seconds']:.0f}s: decoder {layer_bytes / 1e9:.1f} GB, head {head_bytes / 1e6:.0f} MB")
    timers = Timers(pipe)
    size = shapes["size"]
    evaluations = head_evaluations(pipe.sampler_settings())
    report["head_evaluations_per_token"] = evaluations
    loops = {"reference": {"loop": "reference"}, "fast": {}, "fast-batched": {"exact": False},
             "fast-batched+compile": {"exact": False, "compile": True}}
    report["loops"] = {}
    reference_tokens = None
    for name, options in loops.items():
        try:
            generate_timed(pipe, timers, 32, **options)  # warm-up (and compile)
            result = generate_timed(pipe, timers, size, **options)
        except Exception as exc:  # report and go on: one failing path must not hide the others
            report["loops"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log(f"{name}: {report['loops'][name]['error']}")
            continue
        tokens = result.pop("_tokens")
        if reference_tokens is None:
            reference_tokens = tokens
        result["max_abs_difference_to_reference"] = float((tokens.float() - reference_tokens.float()).abs().max())
        result["head_ms_per_evaluation"] = result["head_ms_per_token"] / evaluations
        report["loops"][name] = result
        log(f"{name}: {json.dumps(result)}")
    report["head_evaluation_ms"] = {"eager": time_head_evaluation(pipe)}
    if device.type == "cuda":
        try:
            report["head_evaluation_ms"]["cuda_graph"] = time_head_evaluation(pipe, compiled=True)
        except Exception as exc:
            report["head_evaluation_ms"]["cuda_graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
    log(f"head evaluation: {report['head_evaluation_ms']}")
    big = shapes["big_size"]
    try:
        report[f"fast_{big}px"] = {k: v for k, v in generate_timed(pipe, timers, big).items() if k != "_tokens"}
        log(f"{big}px: {report[f'fast_{big}px']}")
    except Exception as exc:
        report[f"fast_{big}px"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}

    # fp8 e4m3fn storage (upcast to bf16 per product), then fp8 x fp8 products (_scaled_mm).
    try:
        bf16_tokens = pipe.generate(PROMPT, width=size, height=size, seed=1).tokens
        convert_to_fp8(pipe, fp8_matmul=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        fp8_bytes = decoder_layer_bytes(pipe)
        report["fp8"] = {"decoder_weight_gb": fp8_bytes / 1e9, "decode_floor_ms": 1e3 * fp8_bytes / bandwidth}
        for label, matmul in (("upcast", False), ("scaled_mm", True)):
            set_fp8_matmul(pipe, matmul)
            generate_timed(pipe, timers, 32)
            result = generate_timed(pipe, timers, size)
            tokens = result.pop("_tokens")
            result["max_abs_difference_to_bf16"] = float((tokens.float() - bf16_tokens.float()).abs().max())
            report["fp8"][label] = result
            log(f"fp8 {label}: {result}")
    except Exception as exc:
        report.setdefault("fp8", {})["error"] = f"{type(exc).__name__}: {exc}"[:500]
        log(f"fp8: {report['fp8']['error']}")
    # Block swap (on the fp8 model when the conversion worked): the last 4 layers kept in CPU
    # memory and streamed in with prefetch; the tokens must equal those without swap (same seed).
    # Last, because disable_block_swap leaves the layers on their storage device.
    small = 32
    try:
        plain = pipe.generate(PROMPT, width=small, height=small, seed=1).tokens
        enable_block_swap(pipe.model, min(4, len(pipe.model.backbone.layers) - 1))
        swapped = generate_timed(pipe, timers, small)
        swapped_tokens = swapped.pop("_tokens")
        disable_block_swap(pipe.model)
        swapped["equal_to_no_swap"] = bool(torch.equal(plain, swapped_tokens))
        report["block_swap_4_layers"] = swapped
        log(f"block swap: {swapped}")
    except Exception as exc:
        report["block_swap_4_layers"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        log(f"block swap: {report['block_swap_4_layers']}")

    if device.type == "cuda":
        report["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return report


def markdown(report: dict) -> str:
    lines = [f"{report['device']}, torch {report['torch']}, shapes {report['shapes']}: decoder "
             f"{report['decoder_weight_gb']:.1f} GB bf16, head {report['head_weight_mb']:.0f} MB; read bandwidth "
             f"{report['read_bandwidth_gb_s']:.0f} GB/s -> floors: decode {report['decode_floor_ms']:.2f} ms/token, "
             f"head {report['head_floor_ms']:.3f} ms/evaluation.", "",
             "| loop | tokens/s | decode ms/token | floor/decode | head ms/token | head ms/eval "
             "| max diff to reference |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["loops"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['decode_ms_per_token']:.2f} | "
                     f"{report['decode_floor_ms'] / r['decode_ms_per_token']:.0%} | {r['head_ms_per_token']:.2f} | "
                     f"{r['head_ms_per_evaluation']:.3f} | {r['max_abs_difference_to_reference']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="14b", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_14b.json"))
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    report = run(args.shapes, torch.device(args.device), log)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
