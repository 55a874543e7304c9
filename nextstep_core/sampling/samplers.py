"""Sampling one image token with the flow head: time grids, step updates, guidance.

Every function here works on one generated token: `condition` holds one row per guidance
branch and image, BRANCH-major: rows [b * images : (b + 1) * images] belong to branch b.

Samplers:
- `euler_maruyama` (NextStep-1.0): `steps` grid points evenly in [0, 1 - 0.04], shifted; an
  Euler-Maruyama step of the SDE with drift (1 + t) v - x and diffusion sqrt(2 (1 - t)) between
  consecutive points, then a deterministic Euler step of 0.04. `steps` head evaluations.
- `sde`, `cps`, `ode` (NextStep-1.1): `steps` points k/steps, shifted, then 1.0; each step
  predicts the noise x0 and data x1 and moves between them. `steps` head evaluations.

Few-step samplers (this project's; opt-in, same grid as 1.1, see solvers.py):
- `heun`: 2nd-order flow ODE (Euler predictor, trapezoid corrector): 2 * steps head evaluations.
- `midpoint`: 2nd-order flow ODE (explicit midpoint): 2 * steps head evaluations.
- `dpm2m`: DPM-Solver++(2M) for the flow's data prediction x1 = x + (1 - t) v, deterministic,
  one head evaluation per step (2nd order from the previous step's x1).
- `dpm2m_sde`: its stochastic form (noise_level = eta: 0 gives dpm2m, 1 the full SDE).
`head_evaluations(settings)` gives the count; RECOMMENDED_STEPS the preset step counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.prompt import COND, UNCOND_IMAGE, UNCOND_TEXT
from ..errors import NextStepError

LAST_STEP_SIZE = 0.04
CONTRACT_SAMPLERS = ("euler_maruyama", "sde", "cps", "ode")
FEW_STEP_SAMPLERS = ("heun", "midpoint", "dpm2m", "dpm2m_sde")
SAMPLERS = CONTRACT_SAMPLERS + FEW_STEP_SAMPLERS
# Step counts for the few-step samplers when `steps` is left to the default (benchmarks/README.md).
RECOMMENDED_STEPS = {"heun": 4, "midpoint": 4, "dpm2m": 8, "dpm2m_sde": 8}
CFG_SCHEDULES = ("constant", "linear")



@dataclass(frozen=True)
class SamplerSettings:
    """How to sample each token.

    name: one of SAMPLERS. steps: grid steps per token (>= 1; head evaluations per token for
    all but heun and midpoint, see head_evaluations). shift: time shift s,
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
        if int(self.steps) != self.steps or self.steps < 1:
            raise NextStepError(f"steps {self.steps} must be a whole number >= 1")
        if self.name == "euler_maruyama" and self.steps < 2:
            raise NextStepError("steps 1 is too few for the euler_maruyama sampler: use at least 2")
        if not self.shift > 0:
            raise NextStepError(f"shift {self.shift} must be > 0")
        if not 0 <= self.noise_level <= 1:
            raise NextStepError(f"noise level {self.noise_level} must be in [0, 1]")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = t / (s - (s - 1) t): s > 1 spends more steps near the noise end."""
    return t / (shift - (shift - 1) * t)


def time_grid(name: str, steps: int, shift: float) -> torch.Tensor:
    """The float32 time points of a sampler: (steps,) for euler_maruyama, (steps + 1,) otherwise."""
    if name == "euler_maruyama":
        return shift_time(torch.linspace(0, 1 - LAST_STEP_SIZE, steps), shift)
    grid = shift_time(torch.linspace(0, 1, steps + 1)[:-1], shift)
    return torch.cat([grid, torch.ones(1)])


def guidance_scales(k: int, num_tokens: int, cfg: float, cfg_img: float, schedule: str,
                    rising: bool) -> tuple[float, float]:
    """The (cfg, cfg_img) used for the k-th generated token (k from 0) of num_tokens.

    constant: the given scales. linear, falling (1.0): 1 + (scale - 1) (N - k) / N.
    linear, rising (1.1): max(scale / 2, 1 + (scale - 1) k / N).
    """
    if schedule == "constant":
        return cfg, cfg_img
    if schedule != "linear":
        raise NextStepError(f"cfg schedule {schedule!r} is not one of {', '.join(CFG_SCHEDULES)}")
    if rising:
        return tuple(max(s / 2, 1 + (s - 1) * k / num_tokens) for s in (cfg, cfg_img))
    return tuple(1 + (s - 1) * (num_tokens - k) / num_tokens for s in (cfg, cfg_img))


def combine_guidance(velocity: torch.Tensor, branches: list[str], cfg: float, cfg_img: float) -> torch.Tensor:
    """Branch-major velocities (len(branches) * n, D) -> guided velocity (n, D).

    [cond]:                                 v1
    [cond, uncond_text]:                    v2 + cfg (v1 - v2)
    [cond, uncond_image]:                   v3 + cfg_img (v1 - v3)
    [cond, uncond_text, uncond_image]:      v3 + cfg_img (v2 - v3) + cfg (v1 - v2)
    """
    parts = dict(zip(branches, velocity.chunk(len(branches), dim=0)))
    v = parts[COND]
    if UNCOND_TEXT in parts and UNCOND_IMAGE in parts:
        v2, v3 = parts[UNCOND_TEXT], parts[UNCOND_IMAGE]
        return v3 + cfg_img * (v2 - v3) + cfg * (v - v2)
    if UNCOND_TEXT in parts:
        return parts[UNCOND_TEXT] + cfg * (v - parts[UNCOND_TEXT])
    if UNCOND_IMAGE in parts:
        return parts[UNCOND_IMAGE] + cfg_img * (v - parts[UNCOND_IMAGE])
    return v


def clamp_velocity_norm(guided: torch.Tensor, conditional: torch.Tensor) -> torch.Tensor:
    """Scale each row of the guided velocity by min(1, |v_cond| / (|v| + 1e-6))."""
    ratio = conditional.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-6)
    return guided * ratio.clamp(max=1.0)


def normalize_token(token: torch.Tensor) -> torch.Tensor:
    """`use_norm`: layer-normalise each token over its numbers (no affine, eps 1e-6)."""
    return F.layer_norm(token, token.shape[-1:], eps=1e-6)


def head_evaluations(settings: SamplerSettings) -> int:
    """Head evaluations per token (each on every guidance branch at once)."""
    if settings.name in ("heun", "midpoint"):
        return 2 * settings.steps
    return settings.steps


def evaluation_times(settings: SamplerSettings) -> torch.Tensor:
    """(head_evaluations,) float32: the times at which the sampler evaluates the head, in order."""
    grid = time_grid(settings.name, settings.steps, settings.shift)
    if settings.name == "euler_maruyama":
        return grid
    if settings.name == "heun":
        return torch.stack([grid[:-1], grid[1:]], dim=1).reshape(-1)
    if settings.name == "midpoint":
        return torch.stack([grid[:-1], grid[:-1] + (grid[1:] - grid[:-1]) / 2], dim=1).reshape(-1)
    return grid[:-1]


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[], torch.Tensor]


def euler_maruyama(velocity: VelocityFn, noise: NoiseFn, settings: SamplerSettings) -> torch.Tensor:
    """NextStep-1.0's sampler. velocity(x, t) gives the guided velocity of the state x."""
    grid = time_grid("euler_maruyama", settings.steps, settings.shift)
    x = noise()
    for t_i, t_j in zip(grid[:-1], grid[1:]):
        dt = t_j - t_i
        v = velocity(x, t_i)
        # drift (1 + t) v - x, written as v + (1 - t) * score with score = (t v - x) / (1 - t)
        # the way the reference evaluates it, so the float results match.
        variance = (1 - t_i) ** 2 + t_i * (1 - t_i)
        drift = v + (1 - t_i) * ((t_i * v - x) / variance)
        x = x + drift * dt + torch.sqrt(2 * (1 - t_i)) * (noise() * torch.sqrt(dt))
    return x + velocity(x, grid[-1]) * LAST_STEP_SIZE


def flow_step_sampler(velocity: VelocityFn, noise: NoiseFn, settings: SamplerSettings) -> torch.Tensor:
    """NextStep-1.1's samplers (`sde`, `cps`, `ode`) over the grid k/N (shifted) then 1."""
    grid = time_grid(settings.name, settings.steps, settings.shift)
    level = settings.noise_level
    x = noise()
    for i in range(settings.steps):
        t_i, t_j = grid[i], grid[i + 1]
        v = velocity(x, t_i)
        x0 = x - v * t_i  # the noise this state came from
        x1 = x + v * (1 - t_i)  # the data it is heading to
        if settings.name == "ode":
            x = (1 - t_j) * x0 + t_j * x1
        elif settings.name == "sde":
            sigma, dt = 1 - t_i, t_j - t_i
            sigma_denominator = grid[settings.steps - 1] if sigma == 1 else sigma
            std = level * torch.sqrt(sigma / (1 - sigma_denominator))
            x = (1 - t_j) * x0 + t_j * x1 - std**2 * dt / (2 * sigma) * x0 + std * torch.sqrt(dt) * noise()
        else:  # cps
            std = (1 - t_j) * math.sin(level * math.pi / 2)
            x = torch.sqrt(((1 - t_j) ** 2 - std**2).clamp(min=0)) * x0 + t_j * x1 + std * noise()
    return x


def run_sampler(velocity: VelocityFn, noise: NoiseFn, settings: SamplerSettings) -> torch.Tensor:
    """One token's state (n, D): the sampler named by settings, from its initial noise draw."""
    if settings.name == "euler_maruyama":
        return euler_maruyama(velocity, noise, settings)
    if settings.name in CONTRACT_SAMPLERS:
        return flow_step_sampler(velocity, noise, settings)
    from .solvers import FEW_STEP_SOLVERS

    return FEW_STEP_SOLVERS[settings.name](velocity, noise, settings)


def sample_token(
    net,
    condition: torch.Tensor,
    *,
    branches: list[str],
    cfg: float,
    cfg_img: float,
    settings: SamplerSettings,
    noise: NoiseFn,
    state_dtype: torch.dtype,
) -> torch.Tensor:
    """Sample one token per image from the head.

    Args:
        net: the flow net, net(x, t, condition) -> velocity.
        condition: (len(branches) * n, cond_dim) head conditions, branch-major.
        noise: draws a fresh (n, token_dim) noise block in the sampling state's dtype.
        state_dtype: dtype of the sampling state (float32 for 1.0, the condition's for 1.1).
    Returns:
        (n, token_dim) tokens in the condition's dtype.
    """
    num_branches = len(branches)
    rows = condition.shape[0]
    condition_embedding = net.cond_embed(condition)  # constant over the steps of this token

    def guided_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_rows = t.expand(rows).to(condition)
        y = net.time_embed(t_rows) + condition_embedding
        raw = net.forward_embedded(x.repeat(num_branches, 1).to(condition.dtype), y).to(state_dtype)
        guided = combine_guidance(raw, branches, cfg, cfg_img)
        if settings.velocity_norm and num_branches > 1:
            guided = clamp_velocity_norm(guided, raw[: guided.shape[0]])
        return guided

    return run_sampler(guided_velocity, noise, settings).to(condition.dtype)
