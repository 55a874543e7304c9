"""benchmarks/gpu_check_comfy.py, the ComfyUI part of the GPU check, run here as its dry run (ComfyUI
in CPU mode): the loader node's dtype, the bytes ComfyUI counts, the memory a generation reserves
and a generation beside a second resident model, with the keys the device run writes."""

import sys

from comfy_harness import REPO, needs_comfyui

pytestmark = needs_comfyui


def test_the_comfy_part_of_the_gpu_check_on_the_cpu():
    modules_before, path_before = set(sys.modules), list(sys.path)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check_comfy

        report = gpu_check_comfy.check(dry=True)
    finally:
        sys.path[:] = path_before
        for name in set(sys.modules) - modules_before:
            del sys.modules[name]
    assert report["load_device"] == "cpu" and report["vram_state"] == "DISABLED"
    assert report["loader_dtype"] in ("float32", "bfloat16") and report["block_swap"] == 0
    assert report["loader_precision"] in ("fp32", "bf16", "bf16 (computing in float32)")
    assert report["comfy_model_size_bytes"] == report["state_dict_bytes"] > 0  # nothing swapped: the whole model
    assert report["comfy_loaded_bytes"] == report["comfy_model_size_bytes"]  # loaded whole
    assert report["memory_required_bytes"] > 0 and report["tokens"] == 16  # 64x64: 4x4 tokens
    assert report["peak_vram_gb"] is None and isinstance(report["second_model_still_loaded"], bool)
