"""Small pieces of benchmarks/gpu_check.py: error text, freeing memory, differences, a log
handler that counts failed CUDA-graph captures, and the progress callback that times a window
of the token loop."""

from __future__ import annotations

import gc
import logging
import time

import gpu_14b
import torch


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:800]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


class CaptureFailures(logging.Handler):
    """Counts the graph module's "capture failed" warnings (the step then runs eagerly)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "capture failed" in record.getMessage():
            self.count += 1


class Window:
    """A progress callback that times the token loop between token `start` and `start + count`
    (or until `cap_seconds` have passed, or the image ends), synchronising only at those two
    points, and then stops the generation. With `timers`, their totals are reset at the start
    (the prefill time read first), so they cover the window alone."""

    def __init__(self, device: torch.device, start: int, count: int, cap_seconds: float, timers=None):
        self.device, self.start, self.count, self.cap = device, start, count, cap_seconds
        self.timers = timers
        self.called = time.perf_counter()
        self.t0 = self.t1 = None
        self.measured = 0
        self.prefill = None
        self.split = None

    def __call__(self, done: int, total: int, tokens: torch.Tensor):
        if done == self.start:
            gpu_14b.synchronize(self.device)
            self.t0 = time.perf_counter()
            if self.timers is not None:
                self.prefill = self.timers.totals["prefill"]
                self.timers.reset()
            return None
        if self.t0 is None or self.t1 is not None:
            return None
        if done - self.start >= self.count or done == total or time.perf_counter() - self.t0 >= self.cap:
            gpu_14b.synchronize(self.device)
            self.t1 = time.perf_counter()
            self.measured = done - self.start
            if self.timers is not None:
                self.split = dict(self.timers.totals)
            return False if done < total else None
        return None

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0
