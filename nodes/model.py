"""What travels on NextStep wires, and how ComfyUI's model management moves it.

A NEXTSTEP_MODEL wire carries a `LoadedNextStep`: the engine's pipeline (text tokenizer,
transformer, image tokenizer) with the transformer and the image tokenizer each wrapped in a
`comfy.model_patcher.ModelPatcher`. ComfyUI then decides where the weights live: they are
loaded onto the offload device (CPU RAM), moved to the GPU by `load_models_gpu` right before a
node runs, and unloaded when ComfyUI needs the memory for something else (or on POST /free).
A NEXTSTEP_VAE wire carries the image tokenizer alone (`LoadedImageTokenizer`).

The transformer and the tokenizer are plain PyTorch modules (no comfy.ops layers), so
ComfyUI cannot stream them in pieces ("lowvram"): they are always loaded whole
(`force_full_load`), and ComfyUI frees other models first to make room.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_management as mm
import comfy.model_patcher
import torch
from comfy_api.latest import io

from ..nextstep_core.pipeline import NextStepPipeline

NextStepModelType = io.Custom("NEXTSTEP_MODEL")
NextStepVAEType = io.Custom("NEXTSTEP_VAE")

DTYPE_CHOICES = ["auto", "bfloat16", "float16", "float32"]


def pick_dtype(choice: str) -> str:
    """`auto`: bfloat16 where ComfyUI says the GPU runs it well, else float32 (CPU, old GPUs).

    float16 is never picked automatically: the Qwen2 decoder's activations can overflow it.
    """
    if choice != "auto":
        return choice
    return "bfloat16" if mm.should_use_bf16(mm.get_torch_device()) else "float32"


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


def wrap_pipeline(pipe: NextStepPipeline, name: str) -> LoadedNextStep:
    """Put the pipeline's networks under ComfyUI's model management (they stay where they are until a node needs them)."""
    patcher = comfy.model_patcher.ModelPatcher(pipe.model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    # The tokenizer runs on the transformer's device even with --cpu-vae: the engine encodes an
    # edit's reference image on the model's device.
    vae_patcher = comfy.model_patcher.ModelPatcher(pipe.image_tokenizer, load_device=mm.get_torch_device(),
                                                   offload_device=mm.vae_offload_device())
    return LoadedNextStep(pipe, patcher, LoadedImageTokenizer(pipe.image_tokenizer, vae_patcher), name)


def load_onto_device(*patchers: comfy.model_patcher.ModelPatcher) -> None:
    """Ask ComfyUI to bring these networks onto their load device, whole (see the module doc)."""
    mm.load_models_gpu(list(patchers), force_full_load=True)


def offload_device() -> torch.device:
    return mm.unet_offload_device()


def to_output(tensor: torch.Tensor) -> torch.Tensor:
    """Outputs leave nodes as float32 on ComfyUI's intermediate device, like native nodes' outputs."""
    return tensor.to(device=mm.intermediate_device(), dtype=torch.float32)
