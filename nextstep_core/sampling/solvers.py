"""Few-step samplers for the flow head: fewer head evaluations per token for the same flow.

All share NextStep-1.1's grid (`steps` points k/steps, shifted, then 1.0) and its convention
(t = 0 noise, t = 1 data, the net predicts v = x1 - x0). Each takes velocity(x, t) (the guided
velocity), noise() (draws an (n, D) block) and the settings, and evaluates the head exactly at
sampling.evaluation_times(settings), in that order. Coefficients are plain floats, worked out
once from the grid.

- heun: Euler predictor, trapezoid corrector (the corrector also at t = 1, where the flow's
  velocity is still defined).
- midpoint: explicit midpoint rule.
- dpm2m / dpm2m_sde: DPM-Solver++(2M) on the data prediction x1 = x + (1 - t) v with
  alpha_t = t, sigma_t = 1 - t, lambda_t = log(alpha_t / sigma_t); the first step after
  t = 0 and the step onto t = 1 are first order (lambda is infinite there). The SDE form with
  eta = noise_level (k-diffusion's "midpoint" variant):
      q = exp(-h) = alpha_i sigma_j / (sigma_i alpha_j)
      x_j = sigma_j / sigma_i q^eta x_i + alpha_j (1 - q^(1 + eta)) D + sigma_j sqrt(1 - q^(2 eta)) z
      D = x1_i + (x1_i - x1_prev) / (2 r),  r = h_prev / h.
  eta = 0 is the deterministic dpm2m (which, first order, is the 1.1 `ode` step).
"""

from __future__ import annotations

import math

import torch

from .samplers import NoiseFn, SamplerSettings, VelocityFn, time_grid


def heun(velocity: VelocityFn, noise: NoiseFn, settings: SamplerSettings) -> torch.Tensor:
    grid = time_grid(settings.name, settings.steps, settings.shift)
    x = noise()
    for i in range(settings.steps):
        dt = float(grid[i + 1] - grid[i])
        v = velocity(x, grid[i])
        predicted = x + v * dt
        x = x + (v + velocity(predicted, grid[i + 1])) * (dt / 2)
    return x


def midpoint(velocity: VelocityFn, noise: NoiseFn, settings: SamplerSettings) -> torch.Tensor:
    grid = time_grid(settings.name, settings.steps, settings.shift)
    x = noise()
    for i in range(settings.steps):
        t_i = grid[i]
        dt = grid[i + 1] - t_i
        half = x + velocity(x, t_i) * float(dt / 2)
        x = x + velocity(half, t_i + dt / 2) * float(dt)
    return x


def log_snr(t: float) -> float:
    """lambda_t = log(t / (1 - t)); -inf at t = 0, +inf at t = 1."""
    if t <= 0:
        return -math.inf
    if t >= 1:
        return math.inf
    return math.log(t / (1 - t))


def dpm_coefficients(t_prev: float | None, t_i: float, t_j: float, eta: float) -> tuple[float, float, float, float]:
    """(keep, data, correction, noise) for x_j = keep x_i + data D + noise z, where
    D = x1_i + correction (x1_i - x1_prev)."""
    sigma_i, sigma_j, alpha_j = 1 - t_i, 1 - t_j, t_j
    q = t_i * sigma_j / (sigma_i * alpha_j)  # exp(-h); 0 when t_i = 0 or t_j = 1
    keep = sigma_j / sigma_i * q**eta
    data = alpha_j * (1 - q ** (1 + eta))
    noise = sigma_j * math.sqrt(max(0.0, 1 - q ** (2 * eta)))
    correction = 0.0
    h = log_snr(t_j) - log_snr(t_i)
    if t_prev is not None and math.isfinite(h):
        h_prev = log_snr(t_i) - log_snr(t_prev)
        if math.isfinite(h_prev):
            correction = h / (2 * h_prev)
    return keep, data, correction, noise


def dpm_solver_2m(velocity: VelocityFn, noise: NoiseFn, settings: SamplerSettings, eta: float) -> torch.Tensor:
    grid = time_grid(settings.name, settings.steps, settings.shift)
    times = grid.tolist()
    x = noise()
    previous = None
    for i in range(settings.steps):
        t_i, t_j = times[i], times[i + 1]
        x1 = x + velocity(x, grid[i]) * (1 - t_i)
        keep, data, correction, noise_scale = dpm_coefficients(times[i - 1] if i else None, t_i, t_j, eta)
        estimate = x1 if correction == 0 else x1 + (x1 - previous) * correction
        x = x * keep + estimate * data
        if noise_scale > 0 and i + 1 < settings.steps:
            x = x + noise() * noise_scale
        previous = x1
    return x


def dpm2m(velocity: VelocityFn, noise: NoiseFn, settings: SamplerSettings) -> torch.Tensor:
    return dpm_solver_2m(velocity, noise, settings, eta=0.0)


def dpm2m_sde(velocity: VelocityFn, noise: NoiseFn, settings: SamplerSettings) -> torch.Tensor:
    return dpm_solver_2m(velocity, noise, settings, eta=settings.noise_level)


FEW_STEP_SOLVERS = {"heun": heun, "midpoint": midpoint, "dpm2m": dpm2m, "dpm2m_sde": dpm2m_sde}
