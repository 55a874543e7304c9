"""Memory benchmark (issue #5): loading peak RSS, parameter bytes per precision, planner vs measured.

    .venv/bin/python benchmarks/memory.py                     # all three, writes benchmarks/memory.json
    .venv/bin/python benchmarks/memory.py --plan-only 24      # print the plan for NextStep-1 sizes, 24 GiB free

Figures (CPU; see benchmarks/README.md, "Memory"):
- load: peak RSS added while loading a ~270 MB 6-shard bf16 checkpoint, over the loaded weights' bytes;
- bytes: parameter bytes of the demo model and the medium checkpoint per precision;
- plan: the planner's estimate against the measured peak (weights + tensor peak during generate()).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_core.demo.tiny import TinySpec, write_tiny_model  # noqa: E402
from nextstep_core.engine.checkpoint import inspect_model_folder  # noqa: E402
from nextstep_core.engine.precision import parameter_bytes  # noqa: E402
from nextstep_core.memory.plan import GIB, Request, choose_plan, estimate  # noqa: E402
from nextstep_core.memory.probe import load_peak_rss, measure_generation, prompt_length  # noqa: E402
from nextstep_core.pipeline import NextStepPipeline  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "nextstep_core" / "demo_model"
MEDIUM = TinySpec(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=2816, head_dim=512, head_layers=2, shards=6, weight_dtype="bfloat16")
# NextStep-1 / 1.1's decoder (Qwen2.5-14B) with its 1536 x 12 flow head, for --plan-only
NEXTSTEP_14B = TinySpec(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=13824, head_dim=1536, head_layers=12)
PROMPT = "a large red circle in the center, on a blue background"


def plan_vs_measured(folder: Path, width: int, images: int) -> dict:
    pipe = NextStepPipeline.from_folder(folder, precision="fp32")
    length = prompt_length(pipe, PROMPT, width, width, images, 3.0)
    measured = measure_generation(pipe, PROMPT, width=width, height=width, images=images, steps=2)
    request = Request(width=width, height=width, images=images, prompt_tokens=length - 8, on_cpu=True)
    plan = estimate(inspect_model_folder(folder), "fp32", 0, request)
    print(plan.describe())
    return {"model": folder.name, "size": width, "images": images, "estimate": plan.total,
            "measured": measured["total"], "ratio": round(plan.total / measured["total"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan-only", type=float, metavar="FREE_GIB",
                        help="only print the planner's choice for the 14B model at 1024x1024 "
                             "with this much free memory")
    parser.add_argument("--out", default=str(Path(__file__).with_name("memory.json")))
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        if args.plan_only is not None:
            folder = write_shapes_only(Path(tmp))
            print(choose_plan(inspect_model_folder(folder), int(args.plan_only * GIB), Request()).describe())
            return
        medium = write_tiny_model(tmp, spec=MEDIUM)
        report = {"load": [load_peak_rss(medium, p) for p in ("bf16", "fp8_e4m3fn", "fp32")], "bytes": {}}
        for name, folder in (("demo", DEMO), ("medium", medium)):
            report["bytes"][name] = {p: parameter_bytes(NextStepPipeline.from_folder(folder, precision=p).model)
                                     for p in ("fp32", "bf16", "fp8_e4m3fn")}
        small_medium = write_tiny_model(Path(tmp) / "m2", spec=TinySpec(
            hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=1408, head_dim=256, head_layers=2, vae_ch=64))
        report["plan"] = [plan_vs_measured(DEMO, 64, 2), plan_vs_measured(small_medium, 64, 1),
                          plan_vs_measured(medium, 128, 1)]
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def write_shapes_only(root: Path) -> Path:
    """A 14B-shaped model folder (NextStep-1.1 layout, lm_head included, the Flux image tokenizer in vae/)
    whose weights files have headers but no data: enough for the planner and for a load onto the meta
    device, written in milliseconds."""
    from nextstep_core.demo.tiny import tiny_config_dict, tiny_vae_config
    from nextstep_core.demo.tiny_tokenizer import write_tiny_tokenizer
    from nextstep_core.engine.checkpoint import NextStepConfig
    from nextstep_core.engine.model import NextStepModel
    from nextstep_core.engine.vae import build_autoencoder

    folder = root / "NextStep-14B-shapes"
    folder.mkdir()
    write_tiny_tokenizer(folder)
    special = {"boi": 3, "eoi": 4, "placeholder": 5, "pad": 1}
    config = tiny_config_dict(NEXTSTEP_14B, 152064, special, "1.1")
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        model = NextStepModel(NextStepConfig.from_dict(config), NEXTSTEP_14B.head_dim, NEXTSTEP_14B.head_layers)
    write_header_only(folder / "model.safetensors", {name.removeprefix("backbone."): tuple(t.shape) for name, t
                                                     in model.state_dict().items() if "rotary_emb" not in name})
    vae = tiny_vae_config(TinySpec(vae_ch=128, vae_ch_mult=(1, 2, 4, 4), vae_res_blocks=2), "1.1")
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text(json.dumps(vae.to_dict()))
    with torch.device("meta"):
        autoencoder = build_autoencoder(vae)
    write_header_only(folder / "vae" / "diffusion_pytorch_model.safetensors",
                      {name: tuple(t.shape) for name, t in autoencoder.state_dict().items()})
    return folder


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file of these tensors whose data part is a hole (sparse; reads as zeros)."""
    import struct

    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


if __name__ == "__main__":
    main()
