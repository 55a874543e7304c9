"""What travels on NextStep wires, and how ComfyUI's model management moves it.

A NEXTSTEP_MODEL wire carries a `LoadedNextStep`: the engine's pipeline (text tokenizer,
transformer, image tokenizer) with the transformer and the image tokenizer each wrapped in a
`comfy.model_patcher.ModelPatcher`. ComfyUI then decides where the weights live: they are
loaded onto the offload device (CPU RAM), moved to the GPU by `load_models_gpu` right before a
node runs, and unloaded when ComfyUI needs the memory for something else (or on POST /free).
A NEXTSTEP_VAE wire carries the image tokenizer alone (`LoadedImageTokenizer`).

The transformer and the tokenizer are plain PyTorch modules (no comfy.ops layers), so
ComfyUI cannot stream them in pieces ("lowvram"): they are always loaded whole
(`force_full_load`), and ComfyUI frees other models first to make room. With block swap the
engine itself keeps N decoder layers in CPU RAM (hidden from the module tree, so ComfyUI moves
and counts only the resident part) and streams them in during each forward; the copies still
on the GPU after a run or on unload are dropped (`release_swap`, the ON_DETACH callback).
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import weakref
from dataclasses import dataclass, field

import comfy.model_management as mm
import comfy.model_patcher
import torch
from comfy.patcher_extension import CallbacksMP
from comfy_api.latest import io

from ..nextstep_core.memory.plan import Request, choose_plan
from ..nextstep_core.pipeline import NextStepPipeline

NextStepModelType = io.Custom("NEXTSTEP_MODEL")
NextStepVAEType = io.Custom("NEXTSTEP_VAE")

DTYPE_CHOICES = ["auto", "bfloat16", "float16", "float32", "fp8_e4m3fn"]
AUTO_SWAP = -1  # block_swap widget value: let the memory planner decide


def pick_dtype(choice: str) -> str:
    """`auto`: bfloat16 where ComfyUI says the GPU runs it well, else float32 (CPU, old GPUs).

    float16 is never picked automatically: the Qwen2 decoder's activations can overflow it.
    """
    if choice != "auto":
        return choice
    return "bfloat16" if mm.should_use_bf16(mm.get_torch_device()) else "float32"


def plan_memory(files, dtype: str, block_swap: int) -> tuple[str, int]:
    """(precision, block swap) for the loader. On a GPU, `auto` precision and/or block swap -1 are chosen by
    the engine's memory planner from the free memory (for a 1024x1024 image with guidance), and the plan is
    logged; on a CPU auto means float32 (or bfloat16 where ComfyUI prefers it) and no swap."""
    device = mm.get_torch_device()
    if device.type == "cpu" or (dtype != "auto" and block_swap != AUTO_SWAP):
        return pick_dtype(dtype), max(block_swap, 0)
    free = mm.get_free_memory(device)
    precision = "auto" if dtype == "auto" else dtype
    plan = choose_plan(files, free, Request(), precision=precision,
                       block_swap=None if block_swap == AUTO_SWAP else block_swap)
    logging.info("%s", plan.describe())
    return plan.precision, plan.block_swap


def release_swap(loaded: LoadedNextStep) -> None:
    """Drop the block swap's compute copies (the layer prefetched for a next forward) after a run."""
    swap = getattr(loaded.pipe.model, "block_swap", None)
    if swap is not None:
        swap.release()


@dataclass
class LoadedImageTokenizer:
    """The image tokenizer (an `nn.Module` with encode/decode and `.config`) and its patcher."""

    image_tokenizer: torch.nn.Module
    patcher: comfy.model_patcher.ModelPatcher
    # latent -> RGB least-squares fit for the live preview, made once per loaded tokenizer
    preview_factors: torch.Tensor | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.image_tokenizer.config


@dataclass
class LoadedNextStep:
    """A loaded NextStep checkpoint: the engine pipeline plus patchers for its two networks."""

    pipe: NextStepPipeline
    patcher: comfy.model_patcher.ModelPatcher
    vae: LoadedImageTokenizer
    name: str


def return_freed_memory() -> None:
    """Ask glibc's malloc to hand freed heap memory back to the OS (Linux; elsewhere nothing).
    Without it the weights of a freed model stay in the process's malloc arenas, counted in its
    RSS, until something else reuses them."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library (musl): it has no malloc_trim
        pass


def trim_after_free(loaded: LoadedNextStep) -> None:
    """When `loaded` is freed (ComfyUI's /free, or its cache dropping the loader's output), return
    the memory to the OS a moment later, once the deallocation has finished."""
    weakref.finalize(loaded, lambda: threading.Timer(1.0, return_freed_memory).start())


def wrap_pipeline(pipe: NextStepPipeline, name: str) -> LoadedNextStep:
    """Put the pipeline's networks under ComfyUI's model management (they stay where they are until a
    node needs them)."""
    patcher = comfy.model_patcher.ModelPatcher(pipe.model, load_device=load_device(),
                                               offload_device=mm.unet_offload_device())
    # The tokenizer runs on the transformer's device even with --cpu-vae: the engine encodes an
    # edit's reference image on the model's device.
    vae_patcher = comfy.model_patcher.ModelPatcher(pipe.image_tokenizer, load_device=mm.get_torch_device(),
                                                   offload_device=mm.vae_offload_device())
    if getattr(pipe.model, "block_swap", None) is not None:  # unloading also drops the swapped layers' copies
        patcher.add_callback(CallbacksMP.ON_DETACH, lambda *args: pipe.model.block_swap.release())
    loaded = LoadedNextStep(pipe, patcher, LoadedImageTokenizer(pipe.image_tokenizer, vae_patcher), name)
    trim_after_free(loaded)
    return loaded


def load_onto_device(*patchers: comfy.model_patcher.ModelPatcher) -> None:
    """Ask ComfyUI to bring these networks onto their load device, whole (see the module doc)."""
    mm.load_models_gpu(list(patchers), force_full_load=True)


def offload_device() -> torch.device:
    return mm.unet_offload_device()


def load_device() -> torch.device:
    """Where ComfyUI runs the model (its torch device): the compute device the precision is chosen for."""
    return mm.get_torch_device()


def describe_precision(pipe: NextStepPipeline) -> str:
    """The precision a loaded pipeline actually uses, e.g. `bf16`, `fp8_e4m3fn (computing in bfloat16)`,
    `bf16 (computing in float32)` where a CPU without native bfloat16 computes it."""
    precision = pipe.model.precision
    default = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(precision.name)
    if precision.dtype == default:
        return precision.name
    return f"{precision.name} (computing in {str(precision.dtype).removeprefix('torch.')})"


def to_output(tensor: torch.Tensor) -> torch.Tensor:
    """Outputs leave nodes as float32 on ComfyUI's intermediate device, like native nodes' outputs."""
    return tensor.to(device=mm.intermediate_device(), dtype=torch.float32)
