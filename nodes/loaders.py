"""Load NextStep Model: a checkpoint folder from models/nextstep/ (or the embedded demo model)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.ops
import folder_paths
from comfy_api.latest import io

from ..nextstep_core import DEMO_MODEL
from ..nextstep_core.engine.checkpoint import TOKENIZER_FILES, inspect_model_folder
from ..nextstep_core.errors import NextStepError
from ..nextstep_core.pipeline import NextStepPipeline
from .model import (
    AUTO_SWAP,
    DTYPE_CHOICES,
    NextStepModelType,
    NextStepVAEType,
    describe_precision,
    load_device,
    offload_device,
    plan_memory,
    wrap_pipeline,
)

FOLDER = "nextstep"  # models/nextstep/, and the key for extra_model_paths.yaml
DEMO_NAME = "nextstep-demo"  # how the embedded demo model is listed
AUTO = "auto"


def register_folder() -> None:
    """models/nextstep/ first; extra_model_paths.yaml may add more folders under the key `nextstep`."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)


def demo_available() -> bool:
    return (DEMO_MODEL / "config.json").is_file()


def is_tokenizer_folder(path: Path) -> bool:
    """An image tokenizer folder (NextStep-1-f8ch16-Tokenizer) has a config.json but no text tokenizer."""
    return (path / "config.json").is_file() and not any((path / n).is_file() for n in TOKENIZER_FILES)


def subfolders() -> list[tuple[str, Path]]:
    """(name, path) of every folder directly inside the registered nextstep folders; earlier roots win."""
    found: dict[str, Path] = {}
    for root in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            path = Path(root) / entry
            if entry.startswith(".") or not path.is_dir() or entry in found:
                continue
            found[entry] = path
    return list(found.items())


def model_choices() -> list[str]:
    names = [name for name, path in subfolders() if not is_tokenizer_folder(path)]
    if demo_available() and DEMO_NAME not in names:
        names.insert(0, DEMO_NAME)
    return names


def tokenizer_choices() -> list[str]:
    return [AUTO] + [name for name, path in subfolders() if is_tokenizer_folder(path)]


def resolve(name: str) -> Path:
    """A listed name -> its folder. A folder in models/nextstep/ wins over the embedded demo of the same name;
    an unknown name maps to where it would be, so the engine's check names the missing folder."""
    folders = dict(subfolders())
    if name in folders:
        return folders[name]
    if name == DEMO_NAME and demo_available():
        return DEMO_MODEL
    roots = folder_paths.get_folder_paths(FOLDER)
    return Path(roots[0]) / name


class NextStepModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NextStepModelLoader",
            display_name="Load NextStep Model",
            category="NextStep",
            description="Loads a NextStep-1 / NextStep-1.1 checkpoint folder as published (config.json, "
                        "safetensors, tokenizer files). The version (1.0 or 1.1) is detected from the files.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices(),
                               tooltip="A checkpoint folder inside models/nextstep/ (e.g. NextStep-1.1, "
                                       "NextStep-1-Large-Edit). nextstep-demo is the small demo model shipped with "
                                       "the pack."),
                io.Combo.Input("tokenizer", options=tokenizer_choices(), default=AUTO,
                               tooltip="The image tokenizer (VAE) folder. auto: vae/ inside the model folder "
                                       "(NextStep-1.1), or the NextStep-1-f8ch16-Tokenizer folder beside it "
                                       "(NextStep-1.0 models)."),
                io.Combo.Input("dtype", options=DTYPE_CHOICES, default="auto",
                               tooltip="Weight precision. fp8_e4m3fn stores the decoder's matrices in 8 bits "
                                       "(about 15 GB for NextStep-1's 14B parameters instead of 28 GB in bfloat16) "
                                       "and computes in bfloat16. auto: on a GPU the memory planner picks bfloat16 "
                                       "or fp8 for the GPU's total memory and ComfyUI's memory flags (the plan "
                                       "is logged); float32 on the CPU."),
                io.Combo.Input("version", options=[AUTO, "1.0", "1.1"], default=AUTO,
                               tooltip="Which release's prompt layout and sampling defaults to use. auto: detected "
                                       "from the checkpoint's files."),
                io.Int.Input("block_swap", default=AUTO_SWAP, min=AUTO_SWAP, max=200, optional=True,
                             tooltip="Decoder layers kept in CPU RAM and streamed to the GPU while they run (with "
                                     "the next one prefetched): less GPU memory, slower tokens. -1: auto, the memory "
                                     "planner decides for the GPU's total memory and ComfyUI's flags (0 on the CPU)."),
            ],
            outputs=[
                NextStepModelType.Output("model", display_name="model",
                                         tooltip="The NextStep model, for the NextStep sampling nodes."),
                NextStepVAEType.Output("vae", display_name="vae",
                                       tooltip="Its image tokenizer, for NextStep VAE Encode / Decode."),
            ],
        )

    @classmethod
    def validate_inputs(cls, model_name=None):
        # Replaces ComfyUI's "value not in list" check for model_name with the engine's own
        # check of the folder (files present, config readable, weights complete).
        if model_name is None:
            return True
        try:
            inspect_model_folder(resolve(model_name), need_vae=False)
        except NextStepError as exc:
            choices = ", ".join(model_choices()) or "none found; put checkpoint folders in models/nextstep/"
            hint = "" if model_name in model_choices() else f" (choose one of: {choices})"
            return f"{exc}{hint}"
        return True

    @classmethod
    def execute(cls, model_name, tokenizer, dtype, version, block_swap=AUTO_SWAP) -> io.NodeOutput:
        folder = resolve(model_name)
        vae_folder = None if tokenizer == AUTO else resolve(tokenizer)
        files = inspect_model_folder(folder, vae_folder=vae_folder, version=version)
        precision, swap = plan_memory(files, dtype, block_swap)
        # Staged on the offload device, computing where ComfyUI will move it: the precision suits the GPU.
        # comfy.ops layers only where ComfyUI may stream weights (a GPU): on the CPU they would only add a
        # call per product.
        operations = None if load_device().type == "cpu" else comfy.ops.disable_weight_init
        pipe = NextStepPipeline.from_folder(folder, vae_folder, version=version, precision=precision,
                                            block_swap=swap, device=offload_device(), compute_device=load_device(),
                                            operations=operations)
        logging.info("NextStep: loaded %s as NextStep-%s (%s), %s, %d decoder layers swapped", folder,
                     pipe.version.name, "; ".join(pipe.version_reasons), describe_precision(pipe), swap)
        loaded = wrap_pipeline(pipe, model_name, files)
        return io.NodeOutput(loaded, loaded.vae)


register_folder()
NODES = [NextStepModelLoader]
