"""Sampler settings, names and time grids: what every sampler and both token loops share.

Every sampler integrates one image token's flow from noise (t = 0) to data (t = 1) with the
flow head's guided velocity. `prepare_sampler` (samplers.py) turns `SamplerSettings` into a
`Sampler`: the step table worked out once per generation, and the times at which it evaluates
the head, in order.

Samplers (NextStep's own, the contract's):
- `euler_maruyama` (NextStep-1.0): `steps` grid points evenly in [0, 1 - 0.04], shifted; an
  Euler-Maruyama step of the SDE with drift (1 + t) v - x and diffusion sqrt(2 (1 - t)) between
  consecutive points, then a deterministic Euler step of 0.04. `steps` head evaluations.
- `sde`, `cps`, `ode` (NextStep-1.1): `steps` points k/steps, shifted, then 1.0; each step
  predicts the noise x0 and data x1 and moves between them. `steps` head evaluations.

Few-step samplers (this project's; opt-in, same grid as 1.1, see solvers.py): `heun` and
`midpoint` (2 head evaluations per step), `dpm2m` and `dpm2m_sde` (one per step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checks import check_count, check_number
from ..errors import NextStepError

LAST_STEP_SIZE = 0.04
CONTRACT_SAMPLERS = ("euler_maruyama", "sde", "cps", "ode")
FEW_STEP_SAMPLERS = ("heun", "midpoint", "dpm2m", "dpm2m_sde")
SAMPLERS = CONTRACT_SAMPLERS + FEW_STEP_SAMPLERS
# Step counts for the few-step samplers when `steps` is left to the default (benchmarks/README.md).
RECOMMENDED_STEPS = {"heun": 4, "midpoint": 4, "dpm2m": 8, "dpm2m_sde": 8}
# How the guidance scales move over the tokens of an image (guidance.py guidance_scales).
CFG_SCHEDULES = ("constant", "linear")

# velocity(x, t, index) -> the guided velocity (n, D) of the state x (n, D) at time t (a 0-d float32
# tensor), the sampler's evaluation number `index` (t == evaluation_times[index]; the fast loop's head
# reads that evaluation's precomputed time embedding by it)
VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# noise() -> a fresh (n, D) block from the run's generator
NoiseFn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample each token.

    name: one of SAMPLERS. steps: grid steps per token (>= 1; head evaluations per token for
    all but heun and midpoint, which take two per step). shift: time shift s,
    t' = t / (s - (s - 1) t). noise_level: for `sde` / `cps` / `dpm2m_sde`. velocity_norm:
    clamp the guided velocity's norm to the conditional one's (1.1 option).
    """

    name: str = "euler_maruyama"
    steps: int = 50
    shift: float = 1.0
    noise_level: float = 0.8
    velocity_norm: bool = False

    def validate(self) -> None:
        if self.name not in SAMPLERS:
            raise NextStepError(f"sampler {self.name!r} is not one of {', '.join(SAMPLERS)}")
        check_count("steps", self.steps)
        if self.name == "euler_maruyama" and self.steps < 2:
            raise NextStepError("steps 1 is too few for the euler_maruyama sampler: use at least 2")
        check_number("shift", self.shift)
        if not self.shift > 0:
            raise NextStepError(f"shift {self.shift} must be > 0")
        check_number("noise level", self.noise_level, minimum=0, maximum=1)


@dataclass(frozen=True)
class Sampler:
    """A sampler with its step table worked out once: `sampler(velocity, noise)` returns one
    token's state (n, D), starting from its own first noise draw.

    evaluation_times: (head evaluations,) float32, the times at which `run` calls velocity, in
    that order; `run` passes each call's position in it as the velocity's index (the fast loop
    precomputes the head's time embeddings from them).
    """

    settings: SamplerSettings
    evaluation_times: torch.Tensor
    run: Callable[[VelocityFn, NoiseFn], torch.Tensor]

    def __call__(self, velocity: VelocityFn, noise: NoiseFn) -> torch.Tensor:
        return self.run(velocity, noise)

    @property
    def head_evaluations(self) -> int:
        """Head evaluations per token (each on every guidance branch at once)."""
        return len(self.evaluation_times)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = t / (s - (s - 1) t): s > 1 spends more steps near the noise end."""
    return t / (shift - (shift - 1) * t)


def time_grid(name: str, steps: int, shift: float) -> torch.Tensor:
    """The float32 time points of a sampler: (steps,) for euler_maruyama, (steps + 1,) otherwise."""
    if name == "euler_maruyama":
        return shift_time(torch.linspace(0, 1 - LAST_STEP_SIZE, steps), shift)
    grid = shift_time(torch.linspace(0, 1, steps + 1)[:-1], shift)
    return torch.cat([grid, torch.ones(1)])
