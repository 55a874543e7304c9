"""The precision is chosen for the device the model computes on, not the one it is loaded onto:
a model staged in CPU RAM for a GPU keeps bf16 even on a CPU without native bfloat16 (the
CPU's capability is faked both ways, and the GPU is only named, so this runs on any machine)."""

import pytest
import torch

import nextstep_core.engine.precision as precision
from nextstep_core import NextStepPipeline
from nextstep_core.demo.tiny import TinySpec, write_tiny_model
from nextstep_core.engine.precision import Fp8Linear, UpcastLinear, default_exact
from nextstep_core.errors import NextStepError


@pytest.fixture(scope="module")
def bf16_file_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("bf16"), spec=TinySpec(weight_dtype="bfloat16"))


def stored_kinds(pipe) -> set[type]:
    return {type(m) for m in pipe.model.backbone.layers.modules() if isinstance(m, (torch.nn.Linear, UpcastLinear,
                                                                                     Fp8Linear))}


@pytest.mark.parametrize("native", [False, True])
def test_bf16_staged_on_the_cpu_for_a_gpu_stays_bf16(bf16_file_model, monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr(precision, "TOLD", set())
    pipe = NextStepPipeline.from_folder(bf16_file_model, precision="bfloat16", device="cpu",
                                        compute_device=torch.device("cuda", 0))
    assert pipe.device.type == "cpu"  # staged where asked
    assert pipe.dtype == torch.bfloat16 and pipe.model.precision.dtype == torch.bfloat16
    assert pipe.model.precision.stored is None and stored_kinds(pipe) == {torch.nn.Linear}
    assert all(p.dtype == torch.bfloat16 for p in pipe.model.parameters())
    assert {p.dtype for p in pipe.image_tokenizer.parameters()} == {torch.bfloat16}
    fp8 = NextStepPipeline.from_folder(bf16_file_model, precision="fp8", compute_device="cuda")
    assert fp8.dtype == torch.bfloat16 and stored_kinds(fp8) == {Fp8Linear}


def test_the_float32_fallback_applies_only_when_computing_on_that_cpu(bf16_file_model, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    monkeypatch.setattr(precision, "TOLD", set())
    for compute_device in (None, "cpu"):
        pipe = NextStepPipeline.from_folder(bf16_file_model, precision="bf16", compute_device=compute_device)
        assert pipe.dtype == torch.float32 and stored_kinds(pipe) == {UpcastLinear}
    with pytest.raises(NextStepError, match="compute device 'gpu' is not a device name"):
        NextStepPipeline.from_folder(bf16_file_model, compute_device="gpu")


def test_exact_defaults_on_for_the_cpu_and_off_for_cuda(pipe_1_1):
    assert default_exact(torch.device("cpu")) is True
    assert default_exact(torch.device("cuda", 0)) is False and default_exact("mps") is False
    request = dict(width=32, height=32, steps=3, seed=2, num_images=2)
    left = pipe_1_1.generate("a red circle", **request)
    assert torch.equal(left.tokens, pipe_1_1.generate("a red circle", exact=True, **request).tokens)
    assert torch.equal(left.tokens, pipe_1_1.generate("a red circle", loop="reference", **request).tokens)
