"""Branches only a GPU takes, run on the CPU with the device faked: fp8's choice of kernel and
its fp8 x fp8 product, and block swap's side-stream copies with events and pinned storage."""

import contextlib

import pytest
import torch

import nextstep_core.engine.precision as precision
import nextstep_core.memory.offload as offload
from nextstep_core import NextStepPipeline
from nextstep_core.engine.precision import FP8, Fp8Linear, fp8_matmul_available, quantize_weight


@pytest.mark.parametrize("capability,expected", [((9, 0), True), ((8, 9), True), ((8, 6), False), ((7, 5), False)])
def test_fp8_matmul_needs_compute_capability_8_9(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert fp8_matmul_available(torch.device("cuda", 0)) is expected
    assert fp8_matmul_available(torch.device("cpu")) is False


def fp8_linear(weight: torch.Tensor, bias: torch.Tensor, fp8_matmul: bool, dtype=torch.bfloat16) -> Fp8Linear:
    layer = Fp8Linear(weight.shape[1], weight.shape[0], True, dtype, fp8_matmul=fp8_matmul)
    quantized, scale = quantize_weight(weight)
    layer.weight.data, layer.weight_scale.data, layer.bias.data = quantized, scale, bias.to(dtype)
    return layer


def dequantised(layer: Fp8Linear) -> torch.Tensor:
    """The stored weight times its row scales, exactly, in float64."""
    table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).double()
    return table[layer.weight.view(torch.uint8).long()] * layer.weight_scale.double()[:, None]


def cpu_scaled_mm() -> bool:
    """Whether this torch runs torch._scaled_mm on the CPU (2.6 does not; 2.13 does)."""
    one = torch.ones(16, 16).to(FP8)
    try:
        torch._scaled_mm(one, one.t(), scale_a=torch.ones(()), scale_b=torch.ones(()), out_dtype=torch.bfloat16)
    except NotImplementedError:
        return False
    return True


def test_fp8_kernel_choice_and_scaled_mm_product(monkeypatch):
    """Where fp8 matmul is available and asked for, the activations are quantised per row to
    e4m3 (scale = row max / 448) and torch._scaled_mm multiplies (torch runs it on the CPU too).
    Both paths are checked against float64 with bounds from their roundings (u = 2^-8 for
    bfloat16; n u32 sum |x||w| for float32 accumulation): the upcast path rounds the product, the
    scale, their product and the bias sum to bfloat16 (4 u (|P| + |y|)); the fp8 path computes
    the quantised product exactly up to accumulation, then rounds it and the bias sum (2 u)."""
    has_cpu_scaled_mm = cpu_scaled_mm()
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 256) * 0.05, torch.randn(96) * 0.1, torch.randn(5, 256).bfloat16()
    calls = []
    original = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or original(*a, **k))
    upcast = fp8_linear(weight, bias, fp8_matmul=False)
    scaled = fp8_linear(weight, bias, fp8_matmul=True)
    with torch.no_grad():
        y_upcast = upcast(x).double()
        assert not calls  # fp8 matmul not available on this device: upcast
        monkeypatch.setattr(precision, "fp8_matmul_available", lambda device: True)
        if not has_cpu_scaled_mm:  # older torch has it for CUDA only, where fp8_matmul_available can be true
            with pytest.raises(NotImplementedError):
                scaled(x)
            pytest.skip("this torch has no CPU torch._scaled_mm: the fp8 product is checked on newer torch only")
        y_scaled = scaled(x)
        assert len(calls) == 1 and y_scaled.dtype == torch.bfloat16 and y_scaled.shape == (5, 96)
        assert torch.equal(upcast(x).double(), y_upcast)  # fp8_matmul=False never takes the fp8 kernel
    u, n_u32 = 2.0**-8, 257 * 2.0**-24
    w, b = dequantised(upcast), upcast.bias.double()
    product = x.double() @ w.T
    magnitude = x.double().abs() @ w.abs().T
    assert ((y_upcast - (product + b)).abs() <= 4 * u * (product.abs() + (product + b).abs()) + n_u32 * magnitude).all()
    x_scale = x.float().abs().amax(dim=1, keepdim=True) / torch.finfo(FP8).max
    x_quantised = (x.float() / x_scale).to(FP8).double() * x_scale.double()
    product_q = x_quantised @ w.T
    magnitude_q = x_quantised.abs() @ w.abs().T
    expected = product_q + b
    bound = 2 * u * (product_q.abs() + expected.abs()) + n_u32 * magnitude_q
    assert ((y_scaled.double() - expected).abs() <= bound).all()


class FakeCudart:
    def __init__(self, calls):
        self.calls = calls

    def cudaHostRegister(self, pointer, size, flags):
        self.calls.append(("register", pointer, size, flags))
        return 0

    def cudaHostUnregister(self, pointer):
        self.calls.append(("unregister", pointer))
        return 0


class FakeEvent:
    recorded = []

    def record(self, stream):
        FakeEvent.recorded.append(stream)


class FakeStream:
    def __init__(self, device=None):
        self.waited_events, self.waited_streams = [], []

    def wait_event(self, event):
        self.waited_events.append(event)

    def wait_stream(self, other):
        self.waited_streams.append(other)


def test_block_swap_side_stream_branch_gives_identical_outputs(tiny_model_1_0, monkeypatch):
    """The CUDA branch of block swap (pinned storage, copies on a side stream, an event per layer
    that the compute stream waits for, record_stream on every compute copy), with torch.cuda
    faked and the copies made on the CPU: same tokens and images as without swap."""
    plain = NextStepPipeline.from_folder(tiny_model_1_0)
    expected = plain.generate("a red circle", width=32, height=32, steps=3, seed=5, num_images=2)
    compute_stream, contexts, pinned, recorded_on = FakeStream(), [], [], []
    monkeypatch.setattr(offload, "uses_copy_stream", lambda device: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # storage is pinned when CUDA is present
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute_stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contexts.append(stream) or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(pinned))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded_on.append(stream))
    monkeypatch.setattr(FakeEvent, "recorded", [])
    pipe = NextStepPipeline.from_folder(tiny_model_1_0, block_swap=2)
    swap = pipe.model.block_swap
    tensors_per_layer = len(swap.storage[swap.order[0]])
    # One host buffer behind every storage tensor, page-locked in place (CUDA is "present").
    assert pinned == [("register", swap.buffer.data_ptr(), swap.buffer.numel(), 0)] and swap.pinned
    result = pipe.generate("a red circle", width=32, height=32, steps=3, seed=5, num_images=2)
    assert torch.equal(result.tokens, expected.tokens) and torch.equal(result.images, expected.images)
    assert contexts and all(isinstance(s, FakeStream) and s is not compute_stream for s in contexts)
    assert len(FakeEvent.recorded) == swap.transfers  # one event per layer copy
    assert len(compute_stream.waited_events) >= swap.transfers - 1  # compute waits before using a copy
    assert recorded_on and set(map(id, recorded_on)) == {id(compute_stream)}
    assert len(recorded_on) == tensors_per_layer * len(compute_stream.waited_events)
    assert swap.max_resident <= 2
