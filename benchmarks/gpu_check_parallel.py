"""The next-set decoding part of benchmarks/gpu_check.py (kept apart so that script needs two
lines for it): on the device, (1) the tiny model's tokens with parallel_window = W against the
sequential loop and with CUDA graphs against eager at w = 1 and 2 (one capture per pass shape),
and (2) the decoder pass time for k = 1, 2, 4, 8, 16 tokens per guidance row at the 14B layer
shapes (a few layers, bf16) with the 32 x 32 grid's w sweep predicted from it
(benchmarks/parallel_decoding.py). About 30 s on an H100; the dry run uses tiny shapes.
"""

from __future__ import annotations

import tempfile

import torch
from parallel_decoding import passes

from nextstep_core.demo.tiny import write_tiny_model
from nextstep_core.pipeline import NextStepPipeline


def correctness(device: torch.device) -> dict:
    """Bit equality on the device: w = W (4) against sequential, graphs against eager at w < W."""
    with tempfile.TemporaryDirectory() as workdir:
        pipe = NextStepPipeline.from_folder(write_tiny_model(workdir, version="1.1", seed=3), device=device)
    kw = dict(width=64, height=48, num_images=2, steps=3, seed=5, cfg=4.0, decode=False, exact=False)
    out = {}
    for graph in ("off", "on"):
        sequential = pipe.generate(["a red circle", "a blue square"], graph=graph, **kw).tokens
        full = pipe.generate(["a red circle", "a blue square"], graph=graph, parallel_window=4, **kw).tokens
        out[f"full_window_equals_sequential_graph_{graph}"] = bool(torch.equal(full, sequential))
    for w in (1, 2):
        eager = pipe.generate(["a red circle", "a blue square"], graph="off", parallel_window=w, **kw)
        graphed = pipe.generate(["a red circle", "a blue square"], graph="on", parallel_window=w, **kw)
        out[f"w{w}_graph_equals_eager"] = bool(torch.equal(eager.tokens, graphed.tokens))
        out[f"w{w}_forward_passes"] = eager.forward_passes  # (3 - 1) w + 4 - 1
    return out


def measure(device: torch.device, dry: bool) -> dict:
    """Both parts; the pass sweep at tiny shapes on a dry run."""
    sweep = passes(layers=2 if dry else 4, small=dry, dtype="float32" if dry else "bfloat16",
                   context=64 if dry else 1088, repeats=1 if dry else 10, device=str(device))
    return {"correctness": correctness(device), "pass_sweep": sweep}
