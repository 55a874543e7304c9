"""ComfyUI's own partial load (what --novram makes it do, and a partial unload) on the pack's model:
ComfyUI's ModelPatcher.load runs for real, with the meta device standing in for the GPU. Its
comfy.ops Linear layers that do not fit are left in host RAM set to cast on use; everything that
cannot stream and was left behind is moved by the pack (complete_load) and counted; block-swapped
layers stay in their host buffer and are never counted as loaded or freed."""

import sys

import torch
from comfy_harness import needs_comfyui
from test_comfy_gpu_paths import pack  # noqa: F401 - the fixture: ComfyUI and the pack in this process

pytestmark = needs_comfyui


def test_a_partial_load_leaves_only_streaming_layers_and_swapped_layers_behind(pack):  # noqa: F811
    import comfy.model_management as mm
    import comfy.ops

    model, _ = pack
    root = model.__name__.rpartition(".nodes")[0]
    pipeline = sys.modules[f"{root}.nextstep_core.pipeline"]
    demo = sys.modules[root + ".nextstep_core"].DEMO_MODEL
    pipe = pipeline.NextStepPipeline.from_folder(demo, precision="fp8_e4m3fn", block_swap=1,
                                                 operations=comfy.ops.disable_weight_init)
    loaded = model.wrap_pipeline(pipe, "demo")
    swapped = {id(m) for m in model.swapped_modules(pipe.model)}
    assert loaded.patcher.model_size() == mm.module_size(pipe.model) - pipe.model.block_swap.storage_bytes()
    budget = loaded.patcher.model_size() // 3  # a third of the model fits: ComfyUI streams part of it
    loaded.patcher.patch_model(device_to=torch.device("meta"), lowvram_model_memory=budget)
    assert pipe.model.model_lowvram  # ComfyUI did load it partially
    on_device, streaming = 0, 0
    for module in pipe.model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not tensors:
            continue
        if id(module) in swapped:
            assert all(t.device.type == "cpu" for t in tensors)  # in the swap's host buffer
            assert module.comfy_patched_weights is False  # a partial unload will not count it as freed
        elif getattr(module, "comfy_cast_weights", False):
            assert type(module).__name__ == "Linear" and all(t.device.type == "cpu" for t in tensors)
            streaming += 1
        else:
            assert all(t.is_meta for t in tensors), module  # moved by ComfyUI, or after it by complete_load
            on_device += sum(t.numel() * t.element_size() for t in tensors)
    assert streaming > 0
    fp8 = [m for m in pipe.model.modules() if type(m).__name__ == "Fp8Linear" and id(m) not in swapped]
    assert fp8 and all(m.weight.is_meta for m in fp8)  # cannot stream: moved whole
    assert pipe.model.model_loaded_weight_memory == on_device
