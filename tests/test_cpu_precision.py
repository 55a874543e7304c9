"""bf16 and fp8 weights on a CPU without native bfloat16 (AVX2 only, as many AMD and older Intel
CPUs): the decoder's matrices keep their storage, everything computes in float32, and the user
is told once. The CPU's capability is faked both ways, so this runs the same on every machine."""

import logging

import pytest
import torch

import nextstep_core.engine.precision as precision
from nextstep_core import NextStepPipeline
from nextstep_core.demo.tiny import TinySpec, write_tiny_model
from nextstep_core.engine.precision import Fp8Linear, UpcastLinear, for_device, parse_precision

REQUEST = dict(width=32, height=32, steps=3, seed=4, num_images=2, decode=False)


@pytest.fixture(scope="module")
def bf16_file_model(tmp_path_factory):
    """A tiny 1.1 model whose weights are stored in bfloat16, as the releases are."""
    return write_tiny_model(tmp_path_factory.mktemp("bf16"), spec=TinySpec(weight_dtype="bfloat16"))


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    monkeypatch.setattr(precision, "TOLD", set())


def decoder_linears(pipe):
    return [m for m in pipe.model.backbone.layers.modules() if isinstance(m, (torch.nn.Linear, UpcastLinear,
                                                                              Fp8Linear))]


def test_bf16_weights_compute_in_float32_with_bf16_storage(bf16_file_model, no_native_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="nextstep_core"):
        upcast = NextStepPipeline.from_folder(bf16_file_model, precision="bfloat16")
        NextStepPipeline.from_folder(bf16_file_model, precision="bf16")
    told = [r.getMessage() for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert len(told) == 1 and "bf16 weights compute in float32" in told[0]
    linears = decoder_linears(upcast)
    assert linears and all(isinstance(m, UpcastLinear) and m.weight.dtype == torch.bfloat16 for m in linears)
    assert upcast.dtype == torch.float32 and upcast.model.image_head.net.input_proj.weight.dtype == torch.float32
    # The file's values are bf16, so upcasting on use computes exactly what a float32 load computes.
    float32 = NextStepPipeline.from_folder(bf16_file_model, precision="float32")
    tokens = [pipe.generate("a red circle", **REQUEST).tokens for pipe in (upcast, float32)]
    assert torch.equal(*tokens)


def test_fp8_weights_compute_in_float32(bf16_file_model, no_native_bf16):
    fp8 = NextStepPipeline.from_folder(bf16_file_model, precision="fp8_e4m3fn")
    assert fp8.dtype == torch.float32 and all(isinstance(m, Fp8Linear) for m in decoder_linears(fp8))
    explicit = NextStepPipeline.from_folder(bf16_file_model,
                                            precision=parse_precision("fp8_e4m3fn", fp8_compute=torch.float32))
    tokens = [pipe.generate("a red circle", **REQUEST).tokens for pipe in (fp8, explicit)]
    assert torch.equal(*tokens)


def test_native_bf16_cpus_and_gpus_keep_bfloat16(bf16_file_model, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)
    pipe = NextStepPipeline.from_folder(bf16_file_model, precision="bfloat16")
    assert pipe.dtype == torch.bfloat16 and all(isinstance(m, torch.nn.Linear) for m in decoder_linears(pipe))
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    bf16 = parse_precision("bf16")
    assert for_device(bf16, torch.device("cuda", 0)) is bf16  # only CPUs are concerned
    assert for_device(parse_precision("fp32"), torch.device("cpu")).dtype == torch.float32
    assert for_device(bf16, torch.device("cpu")).weight_bytes == 2  # the matrices stay bf16
