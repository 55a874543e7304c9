"""The contract's samplers (euler_maruyama, sde, cps, ode) with their per-step scalars worked
out once per generation instead of once per step.

Every tensor operation on the token state is the reference's (sampling.py), in the same order,
with the same float32 scalars, so the results are the same bits; only the 0-d arithmetic on the
time grid moves out of the loop. `prepare_sampler(settings)` returns sampler(velocity, noise);
the few-step samplers (solvers.py) already work from precomputed floats and are returned as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .samplers import LAST_STEP_SIZE, NoiseFn, SamplerSettings, VelocityFn, run_sampler, time_grid

Sampler = Callable[[VelocityFn, NoiseFn], torch.Tensor]


def prepare_euler_maruyama(settings: SamplerSettings) -> Sampler:
    grid = time_grid("euler_maruyama", settings.steps, settings.shift)
    steps = []
    for t_i, t_j in zip(grid[:-1], grid[1:]):
        dt = t_j - t_i
        variance = (1 - t_i) ** 2 + t_i * (1 - t_i)
        steps.append((t_i, 1 - t_i, variance, dt, torch.sqrt(2 * (1 - t_i)), torch.sqrt(dt)))
    last = grid[-1]

    def sample(velocity: VelocityFn, noise: NoiseFn) -> torch.Tensor:
        x = noise()
        for t_i, one_minus_t, variance, dt, diffusion, sqrt_dt in steps:
            v = velocity(x, t_i)
            drift = v + one_minus_t * ((t_i * v - x) / variance)
            x = x + drift * dt + diffusion * (noise() * sqrt_dt)
        return x + velocity(x, last) * LAST_STEP_SIZE

    return sample


def prepare_flow_steps(settings: SamplerSettings) -> Sampler:
    """sde / cps / ode: per step (t_i, 1 - t_i, and the update's coefficients)."""
    grid = time_grid(settings.name, settings.steps, settings.shift)
    level = settings.noise_level
    steps = []
    for i in range(settings.steps):
        t_i, t_j = grid[i], grid[i + 1]
        if settings.name == "ode":
            coefficients = (1 - t_j, t_j)
        elif settings.name == "sde":
            sigma, dt = 1 - t_i, t_j - t_i
            sigma_denominator = grid[settings.steps - 1] if sigma == 1 else sigma
            std = level * torch.sqrt(sigma / (1 - sigma_denominator))
            coefficients = (1 - t_j, t_j, std**2 * dt / (2 * sigma), std * torch.sqrt(dt))
        else:
            std = (1 - t_j) * math.sin(level * math.pi / 2)
            coefficients = (torch.sqrt(((1 - t_j) ** 2 - std**2).clamp(min=0)), t_j, std)
        steps.append((t_i, 1 - t_i, coefficients))
    name = settings.name

    def sample(velocity: VelocityFn, noise: NoiseFn) -> torch.Tensor:
        x = noise()
        for t_i, one_minus_t, c in steps:
            v = velocity(x, t_i)
            x0 = x - v * t_i
            x1 = x + v * one_minus_t
            if name == "ode":
                x = c[0] * x0 + c[1] * x1
            elif name == "sde":
                x = c[0] * x0 + c[1] * x1 - c[2] * x0 + c[3] * noise()
            else:
                x = c[0] * x0 + c[1] * x1 + c[2] * noise()
        return x

    return sample


def prepare_sampler(settings: SamplerSettings) -> Sampler:
    if settings.name == "euler_maruyama":
        return prepare_euler_maruyama(settings)
    if settings.name in ("sde", "cps", "ode"):
        return prepare_flow_steps(settings)
    return lambda velocity, noise: run_sampler(velocity, noise, settings)
