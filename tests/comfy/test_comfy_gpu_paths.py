"""The loader's GPU-only path, run in-process with ComfyUI's model management claiming a CUDA
device: the memory planner is asked (dtype auto, block_swap -1, the widgets' defaults), its plan
logged, and the model loaded as planned. On a real CPU-only ComfyUI this path never runs
(tests/comfy/test_comfy_gpu_matrix.py runs it for the cards people own, at the 14B shapes)."""

import logging
import sys

import pytest
import torch
from comfy_harness import COMFY_DIR, REPO, needs_comfyui

pytestmark = needs_comfyui

GIB = 1 << 30


@pytest.fixture(scope="module")
def pack():
    """ComfyUI's modules in this process (CPU mode, no argument parsing) and the pack as a package;
    afterwards the process is as before (other tests check an interpreter without ComfyUI)."""
    import importlib.util

    modules_before, path_before = set(sys.modules), list(sys.path)
    sys.path.insert(0, str(COMFY_DIR))
    try:
        from comfy.cli_args import args

        args.cpu = True
        spec = importlib.util.spec_from_file_location("ComfyUI_NextStep_inprocess", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaders = sys.modules[f"{spec.name}.nodes.loaders"]
        loaders.register_folder()
        yield sys.modules[f"{spec.name}.nodes.model"], loaders
    finally:
        sys.path[:] = path_before
        for name in set(sys.modules) - modules_before:
            del sys.modules[name]


@pytest.fixture
def fake_gpu(pack, monkeypatch):
    import comfy.model_management as mm

    free = {"bytes": 80 * GIB}  # the card's total; free memory is never asked for
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(mm, "get_total_memory", lambda device=None, torch_total_too=False: free["bytes"])
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(mm, "unet_offload_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(mm, "vae_offload_device", lambda: torch.device("cpu"))
    return free


def test_plan_memory_on_a_gpu_asks_the_planner_and_logs_the_plan(pack, fake_gpu, caplog):
    from nextstep_core import DEMO_MODEL
    from nextstep_core.engine.checkpoint import inspect_model_folder

    model, _ = pack
    files = inspect_model_folder(DEMO_MODEL)
    with caplog.at_level(logging.INFO):
        precision, swap = model.plan_memory(files, "auto", model.AUTO_SWAP)
    assert (precision, swap) == ("bf16", 0)  # 80 GiB free: the first plan fits
    assert any("bf16" in record.getMessage() for record in caplog.records)
    assert model.plan_memory(files, "fp8_e4m3fn", model.AUTO_SWAP) == ("fp8_e4m3fn", 0)
    fake_gpu["bytes"] = 1 << 20  # 1 MiB: nothing fits, and the message says what to do
    with pytest.raises(Exception, match="nothing fits, even with every decoder layer swapped: run ComfyUI with "
                                        "--cpu$") as error:
        model.plan_memory(files, "auto", model.AUTO_SWAP)
    assert type(error.value).__name__ == "NextStepError"  # the pack's own copy of the engine's class


@pytest.mark.parametrize("native_bf16_cpu", [False, True])
def test_loader_with_default_widgets_on_a_faked_gpu(pack, fake_gpu, monkeypatch, caplog, native_bf16_cpu):
    """Staged on the CPU for the GPU: bf16 whether or not the CPU has native bfloat16 (an AVX2-only
    CPU used to turn it into float32 with UpcastLinear matrices, the GPU then holding twice the plan)."""
    import nextstep_core.engine.precision as engine_precision

    model, loaders = pack
    own_precision = sys.modules[model.__name__.rpartition(".nodes")[0] + ".nextstep_core.engine.precision"]
    for module in (engine_precision, own_precision):
        monkeypatch.setattr(module, "native_bf16_cpu", lambda: native_bf16_cpu)
    with caplog.at_level(logging.INFO):
        output = loaders.NextStepModelLoader.execute("nextstep-demo", "auto", "auto", "auto")
    loaded, vae = output.result
    assert any(r.getMessage().endswith("), bf16, 0 decoder layers swapped") for r in caplog.records)  # as used
    assert loaded.patcher.load_device == torch.device("cuda", 0)
    assert loaded.pipe.model.image_in_projector.weight.dtype == torch.bfloat16  # the plan's choice
    assert {p.dtype for p in loaded.pipe.model.parameters()} == {torch.bfloat16}
    assert not [m for m in loaded.pipe.model.modules() if type(m).__name__ == "UpcastLinear"]
    assert loaded.pipe.device.type == "cpu"  # loaded on the offload device; ComfyUI moves it when a node runs
    assert vae.image_tokenizer is loaded.pipe.image_tokenizer
