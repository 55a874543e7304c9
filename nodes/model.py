"""What travels on NextStep wires, and how ComfyUI's model management moves it.

A NEXTSTEP_MODEL wire carries a `LoadedNextStep`: the engine's pipeline (text tokenizer,
transformer, image tokenizer) with the transformer and the image tokenizer each wrapped in a
`comfy.model_patcher.ModelPatcher`. ComfyUI then decides where the weights live: they are
loaded onto the offload device (CPU RAM), moved to the GPU by `load_models_gpu` right before a
node runs, and unloaded when ComfyUI needs the memory for something else (or on POST /free).
A NEXTSTEP_VAE wire carries the image tokenizer alone (`LoadedImageTokenizer`).

ComfyUI's memory manager is in charge (docs/architecture.md, "Partial loading"):
- the loader plans precision and block swap from the GPU's TOTAL memory and ComfyUI's flags
  (`plan_memory`: --lowvram, --novram, --highvram/--gpu-only, --reserve-vram), never from the
  memory free at load time, so a workflow gets the same precision, split and image whatever
  else is loaded; a setting that cannot fit is refused in one line naming the smallest that does;
- the plan is checked with ComfyUI's own arithmetic (`comfy_need`), and ComfyUI is told the
  model's true size on the GPU: the weights that move there (swapped layers stay in host RAM);
- at each generation the request's working memory (KV cache, activations, head, swap buffers;
  the planner's figures for its size, batch and guidance rows) goes to
  `load_models_gpu(memory_required=...)`, so ComfyUI frees other models first;
- the transformer's plain Linear layers are comfy.ops layers (`operations=`), so where ComfyUI
  streams the model in pieces (--novram, or partial unloading) they cast their weights on use;
  what ComfyUI leaves behind that cannot stream (norms, embeddings, fp8 matrices) is moved after
  it (`complete_load`). The model is loaded whole otherwise (`force_full_load`); block swap keeps
  its layers in host RAM (registered in the module tree) and streams them in each forward.
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

from ..nextstep_core.engine.checkpoint import ModelFiles, inspect_model_folder
from ..nextstep_core.errors import NextStepError
from ..nextstep_core.memory.plan import GIB, MemoryPlan, Request, candidates, choose_plan, estimate
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


PLAN_REQUEST = Request(width=1024, height=1024)  # the released models' size: one image with text guidance


def comfy_need(plan: MemoryPlan) -> int:
    """The free memory ComfyUI makes before it runs this plan (model_management.load_models_gpu): 1.1x the
    weights it moves (transformer and image tokenizer) and the larger of its minimum inference memory
    and the request's working memory plus its reserve (--reserve-vram)."""
    working = max(mm.minimum_inference_memory(), plan.working + mm.extra_reserved_memory())
    return int(1.1 * (plan.weights + plan.vae_weights) + working)


def plan_budgets(device: torch.device) -> list[int]:
    """What the plan may use, in order of preference: the GPU's total memory; under --lowvram (which
    asks to leave room to other models) half of it first, then all of it if nothing fits in half.
    Never the free memory: that depends on what happened to be loaded before."""
    total = mm.get_total_memory(device)
    return [total // 2, total] if mm.vram_state == mm.VRAMState.LOW_VRAM else [total]


def plan_memory(files: ModelFiles, dtype: str, block_swap: int) -> tuple[str, int]:
    """(precision, block swap) for the loader. On a GPU the memory planner chooses what is `auto` (dtype
    auto, block_swap -1) for PLAN_REQUEST from plan_budgets, under ComfyUI's flags: --novram swaps every
    decoder layer (fp8 for auto: the fewest bytes to stream), --highvram / --gpu-only swap none unless
    block_swap says so; the plan is logged. A setting that cannot fit raises one line naming the smallest
    setting that fits. On a CPU: float32 (or bfloat16 where ComfyUI prefers it) and no swap."""
    device = load_device()
    if device.type == "cpu":
        return pick_dtype(dtype), max(block_swap, 0)
    layers = files.config.num_hidden_layers
    no_vram = mm.vram_state == mm.VRAMState.NO_VRAM
    precision = "fp8_e4m3fn" if dtype == "auto" and no_vram else dtype
    swap = None if block_swap == AUTO_SWAP else block_swap
    if swap is None and (no_vram or mm.vram_state == mm.VRAMState.HIGH_VRAM):
        swap = layers if no_vram else 0
    for budget in plan_budgets(device):
        try:
            plan = choose_plan(files, budget, PLAN_REQUEST, precision=precision, block_swap=swap,
                               fits=lambda candidate, budget=budget: comfy_need(candidate) <= budget)
            break
        except NextStepError:
            continue
    else:
        raise NextStepError(refusal(files, device, budget, precision, swap))
    logging.info("%s\n  %-26s%9.2f GiB of %.2f GiB (%s) -> fits", plan.describe(), "ComfyUI's need",
                 comfy_need(plan) / GIB, budget / GIB, mm.vram_state.name)
    return plan.precision, plan.block_swap


def refusal(files: ModelFiles, device: torch.device, budget: int, precision: str, swap: int | None) -> str:
    """One line: what does not fit, what it needs, and the smallest setting that fits (auto dtype and swap)."""
    layers = files.config.num_hidden_layers
    asked = list(candidates(layers, precision, swap))[-1]  # the smallest of the settings asked for
    need = comfy_need(estimate(files, *asked, PLAN_REQUEST))
    smallest = None
    for p, s in candidates(layers, "auto", None):
        if comfy_need(estimate(files, p, s, PLAN_REQUEST)) <= budget:
            smallest = f"dtype {p} with block_swap {s}"
            break
    hint = (f"the smallest setting that fits is {smallest}" if smallest else
            "nothing fits, even with every decoder layer swapped: run ComfyUI with --cpu")
    return (f"{files.folder.name} at {PLAN_REQUEST.width}x{PLAN_REQUEST.height} as {asked[0]} with block_swap "
            f"{asked[1]} needs {need / GIB:.1f} GiB, more than the {budget / GIB:.1f} GiB this "
            f"{mm.get_total_memory(device) / GIB:.0f} GiB GPU gives it ({mm.vram_state.name}): {hint}")


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
    """A loaded NextStep checkpoint: the engine pipeline plus patchers for its two networks, and the
    checkpoint's files (their shapes size each request's working memory)."""

    pipe: NextStepPipeline
    patcher: comfy.model_patcher.ModelPatcher
    vae: LoadedImageTokenizer
    name: str
    files: ModelFiles | None = field(default=None, repr=False)


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


def swapped_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    swap = getattr(model, "block_swap", None)
    return [] if swap is None else [m for i in swap.order for m in model.backbone.layers[i].modules()]


def gpu_bytes(model: torch.nn.Module) -> int:
    """The model's size as it sits on the GPU once loaded: ComfyUI's count (its state dict's bytes) less
    the swapped layers, which stay in host RAM (two of them in flight are working memory)."""
    swap = getattr(model, "block_swap", None)
    return mm.module_size(model) - (0 if swap is None else swap.storage_bytes())


def complete_load(model: torch.nn.Module, patcher: comfy.model_patcher.ModelPatcher, device: torch.device) -> None:
    """After a partial load (--novram; ComfyUI's choice): move what cannot stream and was left behind -
    every tensor outside a comfy.ops layer ComfyUI set to cast on use and outside the swapped layers - and
    count it as loaded. Swapped layers are not loaded: a partial load's count drops them, and they are marked
    unpatched, so a partial unload never counts them as freed."""
    device = torch.device(device)
    skip = {id(m) for m in swapped_modules(model)}
    moved = 0
    for module in model.modules():
        if id(module) in skip or getattr(module, "comfy_cast_weights", False):
            continue
        left = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
                if not t.is_meta and (t.device.type != device.type or device.index not in (None, t.device.index))]
        if left:
            moved += sum(t.numel() * t.element_size() for t in left)
            module._apply(lambda t: t.to(device), recurse=False)  # this module's own tensors only
    for module in swapped_modules(model):  # a partial load counted those it "loaded"; they never moved
        if model.model_lowvram and getattr(module, "comfy_patched_weights", False):
            moved -= sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
        module.comfy_patched_weights = False
    patcher.model.model_loaded_weight_memory += moved


def wrap_pipeline(pipe: NextStepPipeline, name: str, files: ModelFiles | None = None) -> LoadedNextStep:
    """Put the pipeline's networks under ComfyUI's model management (they stay where they are until a
    node needs them), the transformer counted at its size on the GPU (gpu_bytes)."""
    patcher = comfy.model_patcher.ModelPatcher(pipe.model, load_device=load_device(), size=gpu_bytes(pipe.model),
                                               offload_device=mm.unet_offload_device())
    # The tokenizer runs on the transformer's device even with --cpu-vae: the engine encodes an
    # edit's reference image on the model's device.
    vae_patcher = comfy.model_patcher.ModelPatcher(pipe.image_tokenizer, load_device=mm.get_torch_device(),
                                                   offload_device=mm.vae_offload_device())
    patcher.add_callback(CallbacksMP.ON_LOAD, lambda patched, device, *rest: complete_load(pipe.model, patched,
                                                                                          device))
    if getattr(pipe.model, "block_swap", None) is not None:  # unloading also drops the swapped layers' copies
        patcher.add_callback(CallbacksMP.ON_DETACH, lambda *args: pipe.model.block_swap.release())
    loaded = LoadedNextStep(pipe, patcher, LoadedImageTokenizer(pipe.image_tokenizer, vae_patcher), name, files)
    trim_after_free(loaded)
    return loaded


def working_memory(loaded: LoadedNextStep, request: Request) -> int:
    """The planner's working memory (swap buffers + the largest phase) of `request` for this loaded model."""
    if loaded.files is None:
        if loaded.pipe.folder is None:
            return 0
        loaded.files = inspect_model_folder(loaded.pipe.folder, need_vae=False)
    swap = getattr(loaded.pipe.model, "block_swap", None)
    count = 0 if swap is None else len(swap.order)
    return estimate(loaded.files, loaded.pipe.model.precision, count, request).working


def load_for_generation(loaded: LoadedNextStep, *, width: int, height: int, images: int, cfg: float,
                        cfg_img: float | None = None, editing: bool = False, with_vae: bool = False) -> int:
    """Bring the transformer (and the tokenizer, `with_vae`) onto the GPU with this request's working
    memory reserved: ComfyUI frees other models until it fits. Returns the bytes asked for."""
    version = loaded.pipe.version
    cfg_img = (version.edit_cfg_img if editing else 1.0) if cfg_img is None else cfg_img
    branches = 1 + (cfg > 1) + (editing and cfg_img > 1)
    required = working_memory(loaded, Request(width=width, height=height, images=images, branches=branches,
                                              edit=editing))
    load_onto_device(loaded.patcher, *([loaded.vae.patcher] if with_vae else []), memory_required=required)
    return required


def load_onto_device(*patchers: comfy.model_patcher.ModelPatcher, memory_required: int = 0) -> None:
    """Ask ComfyUI to bring these networks onto their load device, whole (see the module doc), with
    `memory_required` bytes free beside them."""
    mm.load_models_gpu(list(patchers), memory_required=memory_required, force_full_load=True)


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
