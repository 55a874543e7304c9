"""What every training stage of the demo shares: its checkpoint file, schedule, step budget and precision.

A stage keeps a resumable checkpoint (`<out>/<stage>.pt`: weights, optimiser state, step) written
atomically (save_state) and picked up again when the stage is run again (resume); its learning
rate warms up linearly, then decays on a cosine (set_learning_rate); its step count is given or
fitted to a time budget (StepBudget); its forward pass may run under bfloat16 autocast
(compute_precision). The stages themselves are in train.py, their data in data.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def save_state(path: Path, **state) -> None:
    """torch.save `state` to `path` through a temporary file, so an interrupted save never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path):
    """What save_state wrote to `path` (tensors on the CPU, read with weights_only=True), or None if no file."""
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def resume(path: Path, module: torch.nn.Module, optimizer) -> int:
    """Load a stage checkpoint into module and optimiser if there is one; returns the step to start from."""
    state = load_state(path)
    if state is None:
        return 0
    module.load_state_dict(state["weights"])
    if state["optimizer"]:  # an imported tokenizer (import_folder) comes without optimiser state
        optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def move_optimizer_state(optimizer, device: str) -> None:
    """Put a resumed optimiser's moment tensors on the training device (they load on the CPU)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)


def set_learning_rate(optimizer, step: int, steps: int, peak: float, warmup: int) -> None:
    """Linear warm-up over `warmup` steps (the same whatever `steps` is), then cosine decay to zero at `steps`."""
    if step < warmup:
        rate = peak * (step + 1) / warmup
    else:
        rate = peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = rate


def compute_precision(device: str, bf16: bool):
    """The context the forward pass runs in (the backward keeps its dtypes): bfloat16 autocast when `bf16` (on CPUs
    with AMX or AVX-512 BF16 its matrix products run ~6x faster than float32; on CPU the math SDPA
    kernel then trains ~1.4x faster than the flash one at these short sequences), else nothing.
    Master weights, optimiser state and losses stay float32 either way."""
    stack = contextlib.ExitStack()
    if bf16:
        device_type = torch.device(device).type
        stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        if device_type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


class StepBudget:
    """Fixes a stage's step count from its own speed when asked to fit a time budget.

    steps > 0: that many steps. steps == 0 with `minutes`: time the first `probe` steps (all
    inside the warm-up, whose learning rate does not depend on the total), then set the total
    so the run ends in about `minutes`; the chosen total is logged, and passing it as `--steps`
    repeats the run exactly. `minutes` with steps > 0 only stops early (saving first)."""

    def __init__(self, steps: int, minutes: float | None, start: int, log, probe: int = 100):
        if steps <= 0 and not minutes:
            raise SystemExit("give --steps, or --steps 0 with --minutes")
        self.steps, self.minutes, self.log, self.probe = steps, minutes, log, probe
        self.start, self.began = start, time.perf_counter()

    def total(self, step: int) -> int:
        """The step count (a provisional large one while still probing)."""
        if self.steps <= 0 and step >= self.start + self.probe:
            rate = (step - self.start) / (time.perf_counter() - self.began)
            remaining = self.minutes * 60 - (time.perf_counter() - self.began)
            self.steps = step + max(1, int(0.97 * rate * remaining))
            self.log(f"steps set to {self.steps} ({rate:.1f} steps/s, {self.minutes} min budget)")
        return self.steps if self.steps > 0 else 1 << 30

    def out_of_time(self) -> bool:
        return bool(self.minutes) and time.perf_counter() - self.began > self.minutes * 60

    def run(self, save_every: int, save) -> Iterator[tuple[int, int]]:
        """Yields (step, total) for each step to run, from `start`. After a step, calls
        save(steps done) every `save_every` steps and at the end (count reached or time up)."""
        step = self.start
        while step < self.total(step):
            yield step, self.total(step)
            step += 1
            done = step >= self.total(step) or self.out_of_time()
            if step % save_every == 0 or done:
                save(step)
            if done:
                if self.steps <= 0:  # still timing the first steps: no count to finish with
                    self.log(f"stopped at step {step}: the {self.minutes} min budget ran out before the step "
                             "count was fixed")
                elif step < self.steps:
                    self.log(f"stopped at step {step} of {self.steps}: the {self.minutes} min budget is "
                             f"spent (run again with --steps {self.steps} to finish)")
                return
