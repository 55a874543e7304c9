"""The smaller traps of the GPU path, with the device faked: the noise copy, graph capture's
failures, compile=True's failures. Each test fails on the code before issue 24."""

import contextlib
import logging

import pytest
import torch

import nextstep_core.sampling.graphs as graphs
from nextstep_core.errors import NextStepError
from nextstep_core.sampling.graphs import capture_cuda_graph
from nextstep_core.sampling.token_loop import GenerationInterrupted, NoiseStream


class Request:  # the fields NoiseStream reads
    generator = None
    num_images, images, num_prompts = 2, 2, 1


@pytest.mark.parametrize("device,non_blocking", [("mps", False), ("xpu", False), ("cuda", True)])
def test_noise_blocks_copy_asynchronously_only_to_cuda(monkeypatch, device, non_blocking):
    request = Request()
    request.generator = torch.Generator().manual_seed(3)
    stream = NoiseStream(request, 4, torch.float32, device, shared_across_prompts=False)
    copies = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append((a, k)) or self)
    blocks = stream.blocks(3)
    assert copies == [((torch.device(device),), {"non_blocking": non_blocking})]
    generator = torch.Generator().manual_seed(3)  # same seed, same noise
    assert torch.equal(blocks, torch.stack([torch.randn(2, 4, generator=generator) for _ in range(3)]))


class FakeGraph:
    def replay(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())


def step_failing_on_capture(error: Exception):
    """A step whose warm-up (first call) works and whose capture (second call) raises `error`."""
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 2:
            raise error
        return torch.full((2,), float(len(calls)))

    return fn


def test_a_capture_only_failure_falls_back_to_eager_and_says_why(fake_cuda, caplog):
    error = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    with caplog.at_level(logging.WARNING, logger=graphs.__name__):
        first, replay = capture_cuda_graph(step_failing_on_capture(error))
    assert replay is None and torch.equal(first, torch.ones(2))  # the warm-up's token stands
    [message] = [r.getMessage() for r in caplog.records]
    assert message == ("CUDA graph capture failed: the step runs an operation CUDA graphs cannot capture "
                       "(CUDA error: operation not permitted when stream is capturing); the tokens run eagerly")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("shape mismatch in the head"), ValueError("a bug")])
def test_out_of_memory_and_other_failures_propagate_from_the_capture(fake_cuda, error):
    with pytest.raises(type(error), match=str(error)):
        capture_cuda_graph(step_failing_on_capture(error))
    assert graphs.capture_only_failure(error) is None


def test_a_compile_failure_names_the_setting(pipe_1_1, monkeypatch):
    """torch.compile only wraps; the compiled head fails on its first call, in the token loop."""
    try:
        from torch._inductor.exc import InductorError
    except ImportError:  # torch < 2.7: Inductor's failures reach us as other torch._dynamo exceptions
        class InductorError(torch._dynamo.exc.TorchDynamoException):
            pass

    def failing_compile(fn, **options):
        def compiled(*args, **kwargs):
            raise InductorError(RuntimeError("no working C compiler found"), None)
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    request = dict(width=32, height=32, steps=2, seed=1)
    with pytest.raises(NextStepError, match=r"^compile=True failed \(InductorError: .*no working C compiler found.*\); "
                                            r"run with compile=False$"):
        pipe_1_1.generate("a red circle", compile=True, **request)
    from nextstep_core.sampling.compiled import compile_failures_named

    with pytest.raises(InductorError):  # compile=False never names compile
        with compile_failures_named(False):
            raise InductorError(RuntimeError("elsewhere"), None)
    with pytest.raises(GenerationInterrupted):  # other errors pass as they are
        with compile_failures_named(True):
            raise GenerationInterrupted("stopped")
