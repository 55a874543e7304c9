"""The token step captured once and replayed (sampling/graphs.py, sampling/token_step.py):
the decision to capture, the recorded replay against the eager step, the static-shape step
against the growing-cache loop, and the CUDA capture path run on the CPU with torch.cuda faked."""

import contextlib

import pytest
import torch

import nextstep_core.pipeline as pipeline_module
from nextstep_core.errors import NextStepError
from nextstep_core.sampling.graphs import RecordedGraph, capture_recorded, graph_mode

PROMPTS = ["a red circle", "two blue squares at the top"]
CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")


def test_graph_mode_decisions():
    assert graph_mode("auto", CUDA, block_swap=False, compile=False) == "cuda"
    assert graph_mode("auto", CPU, block_swap=False, compile=False) is None
    assert graph_mode("auto", MPS, block_swap=False, compile=False) is None
    assert graph_mode("auto", CUDA, block_swap=True, compile=False) is None
    assert graph_mode("auto", CUDA, block_swap=False, compile=True) is None
    assert graph_mode("on", CUDA, block_swap=False, compile=False) == "cuda"
    assert graph_mode(True, CPU, block_swap=False, compile=False) == "recorded"
    assert graph_mode("off", CUDA, block_swap=False, compile=False) is None
    assert graph_mode(False, CUDA, block_swap=False, compile=False) is None
    with pytest.raises(NextStepError, match="graph 'on' does not work with block_swap"):
        graph_mode("on", CUDA, block_swap=True, compile=False)
    with pytest.raises(NextStepError, match="graph 'on' and compile=True both capture graphs"):
        graph_mode("on", CPU, block_swap=False, compile=True)
    with pytest.raises(NextStepError, match="graph 'always' is not one of auto, on, off"):
        graph_mode("always", CPU, block_swap=False, compile=False)


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
@pytest.mark.parametrize("sampler,schedule", [("auto", "constant"), ("auto", "linear"), ("dpm2m_sde", "linear"),
                                              ("heun", "constant")])
def test_recorded_replay_gives_the_eager_static_steps_tokens(pipe_name, sampler, schedule, request):
    """The same aten calls on the same buffers: bit for bit. A value the step read as a Python
    number instead of from its buffers would be frozen at the capture and change the tokens."""
    pipe = request.getfixturevalue(pipe_name)
    kw = dict(width=48, height=32, num_images=2, sampler=sampler, steps=3, seed=5, cfg=4.0, cfg_schedule=schedule,
              decode=False, exact=False)
    eager = pipe.generate(PROMPTS, graph="off", **kw).tokens
    replayed = pipe.generate(PROMPTS, graph="on", **kw).tokens
    assert torch.equal(eager, replayed)


def test_recorded_replay_is_used_and_editing_works(pipe_1_0, monkeypatch):
    from PIL import Image

    replays = []
    original = RecordedGraph.replay
    monkeypatch.setattr(RecordedGraph, "replay", lambda self: replays.append(1) or original(self))
    image = Image.new("RGB", (32, 16), (200, 40, 40))
    kw = dict(image=image, cfg=5.0, cfg_img=2.0, steps=3, seed=3, num_images=2, decode=False, exact=False)
    eager = pipe_1_0.generate("<image> make it blue", graph="off", **kw).tokens
    replayed = pipe_1_0.generate("<image> make it blue", graph="on", **kw).tokens
    assert torch.equal(eager, replayed)
    assert len(replays) == eager.shape[1] - 2  # token 0 eager, token 1 captured, the rest replayed


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
def test_static_step_gives_the_growing_cache_loops_tokens_in_float64(pipe_name, request):
    """The static step attends over the whole preallocated cache with the unfed slots masked;
    the default loop over a cache that grows. Masked slots add exact zeros, so the two differ
    only in summation order: in float64 (unit roundoff 1.1e-16) that stays far below 1e-9 of the
    tokens' size over a whole image, while a wrong position or mask column moves them by O(0.1)."""
    pipe = request.getfixturevalue(pipe_name)
    pipe.model.double()
    try:
        kw = dict(width=48, height=32, num_images=2, steps=4, seed=5, cfg=4.0, decode=False)
        growing = pipe.generate(PROMPTS, **kw).tokens
        static = pipe.generate(PROMPTS, graph="on", **kw).tokens
    finally:
        pipe.model.float()
    assert growing.dtype == torch.float64
    assert (growing - static).abs().max() <= 1e-9 * growing.abs().max()


def test_recorded_graph_freezes_python_values_and_reads_buffers():
    buffer = torch.tensor([1.0, 2.0])
    python_scale = {"value": 3.0}
    output, replay = capture_recorded(lambda: buffer * python_scale["value"] + 1)
    assert output.tolist() == [4.0, 7.0]
    buffer.copy_(torch.tensor([10.0, 20.0]))
    python_scale["value"] = 100.0  # a CUDA graph would not see this either
    assert replay().tolist() == [31.0, 61.0]


def test_recorded_graph_refuses_host_syncs():
    value = torch.tensor(2.0)
    with pytest.raises(NextStepError, match="_local_scalar_dense reads device data on the host"):
        capture_recorded(lambda: value * float(value))
    with pytest.raises(NextStepError, match="nonzero"):
        capture_recorded(lambda: torch.arange(4).nonzero())


class FakeCudaGraph:
    """torch.cuda.CUDAGraph on the CPU: the capture records the calls (RecordedGraph) but, like a
    real capture, leaves no effect: tensors that existed before it and that it writes in place
    (the KV cache and its length) are put back afterwards. replay() writes into the tensor the
    capture returned, as a real replay does."""

    fail = False
    made: list = []

    def __init__(self):
        self.recorder = RecordedGraph()
        FakeCudaGraph.made.append(self)

    def replay(self):
        result = self.recorder.replay()
        self.recorder.output.copy_(result)


class UndoWrites(RecordedGraph):
    """Records into `target`, keeping a copy of every pre-existing tensor before its first write."""

    def __init__(self, target: RecordedGraph):
        super().__init__()
        self.target, self.saved = target, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for argument, value in zip(func._schema.arguments, args):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, torch.Tensor) and id(value) not in self.target.made:
                self.saved.setdefault(id(value), (value, value.clone()))
        return self.target.__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def fake_capture(graph: FakeCudaGraph):
    if FakeCudaGraph.fail:
        raise RuntimeError("operation not permitted when stream is capturing")
    undo = UndoWrites(graph.recorder)
    with undo:
        yield
    for value, saved in undo.saved.values():
        value.copy_(saved)
    last = graph.recorder.calls[-1][3]  # the step's last operation makes its token (layer_norm: the first of three)
    graph.recorder.output = last[0] if isinstance(last, tuple) else last


class FakeStream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


def fake_cuda_graphs(monkeypatch, fail: bool = False) -> type[FakeCudaGraph]:
    """torch.cuda's streams, graph capture and replay faked on the CPU (FakeCudaGraph records
    the graphs made; with `fail` every capture raises)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCudaGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(FakeCudaGraph, "fail", fail)
    monkeypatch.setattr(FakeCudaGraph, "made", [])
    return FakeCudaGraph


@pytest.mark.parametrize("fail", [False, True])
def test_cuda_capture_path_with_torch_cuda_faked(pipe_1_0, monkeypatch, fail):
    """capture_cuda_graph's warm-up, capture and replays (or, when the capture fails, the eager
    fallback after the warm-up's token) give the eager tokens."""
    kw = dict(width=48, height=32, num_images=2, steps=3, seed=5, cfg=4.0, decode=False, exact=False)
    eager = pipe_1_0.generate(PROMPTS, graph="off", **kw).tokens
    fake_cuda_graphs(monkeypatch, fail)
    modes = []
    monkeypatch.setattr(pipeline_module, "graph_mode", lambda *args, **kwargs: modes.append(1) or "cuda")
    graphed = pipe_1_0.generate(PROMPTS, **kw).tokens
    assert modes and len(FakeCudaGraph.made) == 1
    assert torch.equal(eager, graphed)


def test_block_swap_and_graph_on_are_refused_together(tiny_model_1_0):
    from nextstep_core import NextStepPipeline

    pipe = NextStepPipeline.from_folder(tiny_model_1_0, block_swap=1)
    with pytest.raises(NextStepError, match="block_swap"):
        pipe.generate("a red circle", width=32, height=32, steps=2, graph="on")
    auto = pipe.generate("a red circle", width=32, height=32, steps=2, decode=False).tokens
    off = pipe.generate("a red circle", width=32, height=32, steps=2, decode=False, graph="off").tokens
    assert torch.equal(auto, off)
