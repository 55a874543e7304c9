"""Capture a token step once and replay it for every later token: CUDA graphs, and the same
semantics recorded on any device.

A capture function takes `fn` (no arguments: it reads and writes only tensors that outlive
it, such as the step's buffers, the weights and the KV cache), runs it for real once and
returns (that run's output, replay). `replay()` repeats the captured work on the current
contents of those tensors and returns the output tensor.

- `capture_cuda_graph`: a warm-up run on a side stream (the real one), then one
  torch.cuda.CUDAGraph capture of fn; replay launches the whole step as one graph.
- `RecordedGraph` / `capture_recorded`: records the aten operations of the real run and
  replays them in order, reading the tensors that existed before the capture and rebuilding
  the ones made inside it. Python values seen during the capture are frozen, exactly as in a
  CUDA graph, and a host sync (`.item()`, `bool(tensor)`, `nonzero`) raises, as it would
  during a CUDA capture. It lets a CPU run check that a step is graph-safe.

`graph_mode(option, device, ...)` decides which one a generation uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ..errors import NextStepError

Capture = Callable[[Callable[[], torch.Tensor]], tuple[torch.Tensor, Callable[[], torch.Tensor] | None]]
GRAPH_OPTIONS = ("auto", "on", "off")
# Operations that read device data on the host: not allowed while a graph is being captured.
HOST_SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::masked_select",
              "aten::equal", "aten::unique_dim", "aten::_unique2"}


def graph_mode(option: str | bool, device: torch.device, *, block_swap: bool, compile: bool) -> str | None:
    """How the token steps run: "cuda" (CUDA graphs), "recorded" (the recorded replay, any
    device) or None (eagerly).

    option: "auto" (CUDA graphs on a CUDA device, unless block swap or compile=True are on),
    "on" (CUDA graphs on CUDA; the recorded replay elsewhere) or "off"; True / False mean on / off.
    """
    option = {True: "on", False: "off"}.get(option, option)
    if option not in GRAPH_OPTIONS:
        raise NextStepError(f"graph {option!r} is not one of {', '.join(GRAPH_OPTIONS)}")
    if option == "off":
        return None
    if block_swap:  # the swapped layers' copies are made and dropped around every forward
        if option == "on":
            raise NextStepError("graph 'on' does not work with block_swap: use graph 'auto' or 'off'")
        return None
    if compile:  # torch.compile's reduce-overhead mode captures its own graphs
        if option == "on":
            raise NextStepError("graph 'on' and compile=True both capture graphs: choose one")
        return None
    if device.type == "cuda":
        return "cuda"
    return "recorded" if option == "on" else None


def capture_cuda_graph(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
    """A real run of fn on a side stream (warm-up; its output is returned), then one graph
    capture of fn. The capture runs no kernel, so state that fn changes in place (the KV cache,
    its length) changes once, by the warm-up, and then once per replay. If the capture fails in a
    way eager mode survives (capture_only_failure; the reason is logged), replay is None and the
    warm-up's output still stands; any other failure (out of memory included) propagates."""
    device = torch.cuda.current_device()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        first = fn().clone()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            output = fn()
    except RuntimeError as exc:
        reason = capture_only_failure(exc)
        if reason is None:  # out of memory, or a fault eager mode would meet too: the caller must see it
            raise
        logging.getLogger(__name__).warning("CUDA graph capture failed: %s (%s); the tokens run eagerly", reason,
                                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return first, None

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return first, replay


# Messages of failures that only a capture meets (CUDA's stream-capture errors): eager mode runs the same step.
CAPTURE_ONLY_MESSAGES = ("operation not permitted when stream is capturing", "stream is capturing",
                         "cudaErrorStreamCapture", "CUDA graph capture", "capture_begin", "capture_end")


def capture_only_failure(exc: BaseException) -> str | None:
    """Why a CUDA graph capture failed where an eager run would not, or None when eager mode cannot be
    expected to survive it: an out-of-memory error (the eager run needs the same tensors) and any
    other error are the caller's to see."""
    if isinstance(exc, torch.OutOfMemoryError):
        return None
    message = str(exc)
    if any(text.lower() in message.lower() for text in CAPTURE_ONLY_MESSAGES):
        return "the step runs an operation CUDA graphs cannot capture"
    return None


class RecordedGraph(TorchDispatchMode):
    """Records the aten calls made under it (see the module docstring); `replay()` runs them again."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []  # (op, args, kwargs, outputs), tensors kept as they were seen
        self.made: dict[int, int] = {}  # id of a tensor made during the capture -> its call index
        self.output: torch.Tensor | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in HOST_SYNCS:
            raise NextStepError(f"{func._schema.name} reads device data on the host: a graph cannot capture it")
        out = func(*args, **kwargs)
        index = len(self.calls)
        self.calls.append((func, args, kwargs, out))
        for value in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor):
                self.made[id(value)] = index
        return out

    def replay(self) -> torch.Tensor:
        results: dict[int, torch.Tensor] = {}  # id of a captured tensor -> its replayed counterpart

        def current(value):
            return results.get(id(value), value) if isinstance(value, torch.Tensor) else value

        with torch.no_grad():
            for func, args, kwargs, out in self.calls:
                new = func(*tree_map(current, args), **tree_map(current, kwargs))
                pairs = zip(out, new) if isinstance(out, (tuple, list)) else ((out, new),)
                for old, value in pairs:
                    if isinstance(old, torch.Tensor):
                        results[id(old)] = value
        return results[id(self.output)]


def capture_recorded(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """The recorded replay: fn runs once for real under the recorder."""
    recorder = RecordedGraph()
    with recorder:
        output = fn()
    if id(output) not in recorder.made:
        raise NextStepError("the captured step returned a tensor it did not make")
    recorder.output = output
    return output, recorder.replay


CAPTURES: dict[str, Capture] = {"cuda": capture_cuda_graph, "recorded": capture_recorded}


class GraphedStep:
    """A TokenStep-like callable (token k - 1 -> token k) captured at its first call and replayed
    after; the incoming token is copied into a fixed input buffer. If a CUDA capture fails, the
    step goes on eagerly (the first call's token is the warm-up's, a real one)."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], mode: str):
        self.step = step
        self.capture = CAPTURES[mode]
        self.token_in: torch.Tensor | None = None
        self.replay: Callable[[], torch.Tensor] | None = None
        self.captured = False

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if not self.captured:
            self.captured = True
            self.token_in = token.clone()
            first, self.replay = self.capture(lambda: self.step(self.token_in))
            return first
        if self.replay is None:
            return self.step(token)
        self.token_in.copy_(token)
        return self.replay()


class KeyedGraphs:
    """One capture per key (next-set decoding: per pass shape, sampling/parallel.py): the first
    call with a key captures `fn` (which reads only buffers kept for that key) and returns that
    real run's output; later calls with the key replay it. A key whose CUDA capture failed runs
    eagerly from then on."""

    def __init__(self, mode: str):
        self.capture = CAPTURES[mode]
        self.replays: dict[object, Callable[[], torch.Tensor] | None] = {}

    def __call__(self, key, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.replays:
            first, self.replays[key] = self.capture(fn)
            return first
        replay = self.replays[key]
        return fn() if replay is None else replay()
