"""Measure memory, for the tests and benchmarks/memory.py.

- `load_peak_rss(folder, precision)`: load a model in a fresh subprocess and report the peak
  resident memory the load added (Linux VmHWM after loading minus VmRSS before it, the peak
  reset with /proc/self/clear_refs after the imports and a dry run of building the empty
  model), next to the loaded weights' bytes.
- `TensorMemoryTracker`: counts the bytes of live tensor storages created by the ops run under
  it and their peak, like a GPU allocator's max_memory_allocated (without fragmentation or
  library workspaces), so the memory planner can be checked on a CPU.

Run as `python -m nextstep_core.memory.probe load FOLDER PRECISION` to get the load figures as JSON.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parents[2]


def status_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_load_here(folder: str, precision: str) -> dict:
    """In this process: load `folder` at `precision` on the CPU and report bytes (see module doc)."""
    from ..engine.checkpoint import inspect_model_folder
    from ..engine.model import build_empty_model, load_model
    from ..engine.precision import parameter_bytes, quantize_weight

    files = inspect_model_folder(folder, need_vae=False)
    build_empty_model(files)  # imports and first-use allocations belong to the baseline
    quantize_weight(torch.randn(256, 256, dtype=torch.bfloat16))  # first use of the kernels the load runs
    gc.collect()
    reset_peak_rss()
    before = status_kb("VmRSS")
    model = load_model(files, precision=precision)
    peak = status_kb("VmHWM")
    after = status_kb("VmRSS")
    weights = parameter_bytes(model)
    return {"precision": precision, "weights_bytes": weights, "peak_added_bytes": (peak - before) * 1024,
            "kept_added_bytes": (after - before) * 1024, "ratio": (peak - before) * 1024 / weights}


def load_peak_rss(folder: str | Path, precision: str) -> dict:
    """measure_load_here in a fresh Python (so the caller's memory does not count)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "nextstep_core.memory.probe", "load", str(folder), precision],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class TensorMemoryTracker(TorchDispatchMode):
    """Live bytes of the tensor storages made by ops inside `with tracker:`, and their peak.

    Storages that existed before (weights) are not counted. A storage counts while any tensor
    the tracker saw on it is alive.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.owners: dict[int, list] = {}  # storage data_ptr -> [bytes, tensors alive]
        self.known_before: set[int] = set()

    def ignore(self, tensors) -> None:
        """Storages that exist already (the weights) and must not count when an op returns a view of them."""
        self.known_before.update(t.untyped_storage().data_ptr() for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.known_before:
            return
        entry = self.owners.get(ptr)
        if entry is None:
            entry = self.owners[ptr] = [storage.nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self.release, ptr)

    def release(self, ptr: int) -> None:
        entry = self.owners.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.owners[ptr]


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "load":
        sys.exit("usage: python -m nextstep_core.memory.probe load FOLDER PRECISION")
    torch.set_num_threads(1)
    print(json.dumps(measure_load_here(sys.argv[2], sys.argv[3])))


def prompt_length(pipe, prompt: str, width: int, height: int, images: int, cfg: float) -> int:
    """Tokens in the prompt rows generate() builds for this request (padding included)."""
    from ..engine.prompt import build_prompt_rows

    grid = (height // pipe.pixels_per_token, width // pipe.pixels_per_token)
    rows = build_prompt_rows(pipe.tokenizer, [prompt], token_grid=grid, negative=None, positive=None,
                             images_per_prompt=images, edit_grid=None, cfg=cfg, cfg_img=1.0,
                             prepend_bos=pipe.version.prepend_bos)
    return rows.input_ids.shape[1]


def measure_generation(pipe, prompt: str, *, width: int, height: int, images: int = 1, cfg: float = 3.0,
                       steps: int = 4) -> dict:
    """Bytes on the compute device while generating (CPU here): the resident weights of the transformer
    and the image tokenizer, and the peak of every other tensor during generate(), decoding included."""
    from ..engine.precision import parameter_bytes

    weights = parameter_bytes(pipe.model)
    vae = parameter_bytes(pipe.image_tokenizer)
    tracker = TensorMemoryTracker()
    tracker.ignore([*pipe.model.parameters(), *pipe.model.buffers(), *pipe.image_tokenizer.parameters()])
    gc.collect()
    with tracker:
        pipe.generate(prompt, width=width, height=height, num_images=images, cfg=cfg, steps=steps, seed=0)
    return {"weights": weights, "vae_weights": vae, "peak_transient": tracker.peak,
            "total": weights + vae + tracker.peak}
