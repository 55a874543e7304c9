"""The contract's samplers (euler_maruyama for 1.0; sde, cps, ode for 1.1), prepared once.

`prepare_sampler(settings)` returns a `Sampler` for any of SAMPLERS (the few-step ones come
from solvers.py). Each works out its per-step scalars from the time grid once per generation,
as 0-d float32 tensors computed exactly as nextstep-reference.md writes them, so the updates
on the token state are the contract's operations in the contract's order: the same bits as
evaluating the formulas at every step. Both token loops use these samplers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .settings import LAST_STEP_SIZE, NoiseFn, Sampler, SamplerSettings, VelocityFn, time_grid
from .solvers import FEW_STEP_SOLVERS


def prepare_euler_maruyama(settings: SamplerSettings) -> Sampler:
    """NextStep-1.0: per step, x += ((1 + t) v - x) dt + sqrt(2 (1 - t)) sqrt(dt) z, then a last
    deterministic Euler step of 0.04. The drift is written v + (1 - t) (t v - x) / variance, with
    variance = (1 - t)^2 + t (1 - t), as the reference evaluates it."""
    grid = time_grid("euler_maruyama", settings.steps, settings.shift)
    steps = []
    for t_i, t_j in zip(grid[:-1], grid[1:]):
        dt = t_j - t_i
        variance = (1 - t_i) ** 2 + t_i * (1 - t_i)
        steps.append((t_i, 1 - t_i, variance, dt, torch.sqrt(2 * (1 - t_i)), torch.sqrt(dt)))
    last = grid[-1]

    def run(velocity: VelocityFn, noise: NoiseFn) -> torch.Tensor:
        x = noise()
        for i, (t_i, one_minus_t, variance, dt, diffusion, sqrt_dt) in enumerate(steps):
            v = velocity(x, t_i, i)
            drift = v + one_minus_t * ((t_i * v - x) / variance)
            x = x + drift * dt + diffusion * (noise() * sqrt_dt)
        return x + velocity(x, last, len(steps)) * LAST_STEP_SIZE

    return Sampler(settings, grid, run)


def prepare_flow_steps(settings: SamplerSettings) -> Sampler:
    """NextStep-1.1's sde / cps / ode over the grid k/N (shifted) then 1. Each step predicts the
    noise x0 = x - t v and the data x1 = x + (1 - t) v and moves to t_j:
    - ode: x = (1 - t_j) x0 + t_j x1;
    - sde: x = (1 - t_j) x0 + t_j x1 - std^2 dt / (2 sigma) x0 + std sqrt(dt) z, with sigma = 1 - t_i
      and std = level sqrt(sigma / (1 - sigma')), sigma' = sigma except at t_i = 0, where it is
      the grid's last point before 1;
    - cps: std = (1 - t_j) sin(level pi / 2); x = sqrt((1 - t_j)^2 - std^2) x0 + t_j x1 + std z.
    """
    name, level = settings.name, settings.noise_level
    grid = time_grid(name, settings.steps, settings.shift)
    steps = []
    for i in range(settings.steps):
        t_i, t_j = grid[i], grid[i + 1]
        if name == "ode":
            coefficients = (1 - t_j, t_j)
        elif name == "sde":
            sigma, dt = 1 - t_i, t_j - t_i
            sigma_denominator = grid[settings.steps - 1] if sigma == 1 else sigma
            std = level * torch.sqrt(sigma / (1 - sigma_denominator))
            coefficients = (1 - t_j, t_j, std**2 * dt / (2 * sigma), std * torch.sqrt(dt))
        else:
            std = (1 - t_j) * math.sin(level * math.pi / 2)
            coefficients = (torch.sqrt(((1 - t_j) ** 2 - std**2).clamp(min=0)), t_j, std)
        steps.append((t_i, 1 - t_i, coefficients))

    def run(velocity: VelocityFn, noise: NoiseFn) -> torch.Tensor:
        x = noise()
        for i, (t_i, one_minus_t, c) in enumerate(steps):
            v = velocity(x, t_i, i)
            x0 = x - v * t_i
            x1 = x + v * one_minus_t
            if name == "ode":
                x = c[0] * x0 + c[1] * x1
            elif name == "sde":
                x = c[0] * x0 + c[1] * x1 - c[2] * x0 + c[3] * noise()
            else:
                x = c[0] * x0 + c[1] * x1 + c[2] * noise()
        return x

    return Sampler(settings, grid[:-1], run)


def prepare_sampler(settings: SamplerSettings) -> Sampler:
    """The sampler named by settings (validated), its step table worked out once."""
    settings.validate()
    if settings.name == "euler_maruyama":
        return prepare_euler_maruyama(settings)
    if settings.name in ("sde", "cps", "ode"):
        return prepare_flow_steps(settings)
    return FEW_STEP_SOLVERS[settings.name](settings)


def head_evaluations(settings: SamplerSettings) -> int:
    """Head evaluations per token for these settings (each on every guidance branch at once)."""
    return prepare_sampler(settings).head_evaluations


def normalize_token(token: torch.Tensor) -> torch.Tensor:
    """`use_norm`: layer-normalise each sampled token over its numbers (no affine, eps 1e-6)."""
    return F.layer_norm(token, token.shape[-1:], eps=1e-6)
