"""Few-step samplers for the flow head: fewer head evaluations per token for the same flow.

All share NextStep-1.1's grid (`steps` points k/steps, shifted, then 1.0) and its convention
(t = 0 noise, t = 1 data, the net predicts v = x1 - x0). Each `prepare_*` works out its step
table once from the grid and returns a `Sampler` (settings.py): run(velocity, noise) and the
times at which it evaluates the head, in order.

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

from .settings import NoiseFn, Sampler, SamplerSettings, VelocityFn, time_grid


def prepare_heun(settings: SamplerSettings) -> Sampler:
    """Per step: v = velocity(x, t_i); predicted = x + v dt; x += (v + velocity(predicted, t_j)) dt / 2."""
    grid = time_grid(settings.name, settings.steps, settings.shift)
    steps = [(grid[i], grid[i + 1], float(grid[i + 1] - grid[i])) for i in range(settings.steps)]

    def run(velocity: VelocityFn, noise: NoiseFn) -> torch.Tensor:
        x = noise()
        for i, (t_i, t_j, dt) in enumerate(steps):
            v = velocity(x, t_i, 2 * i)
            predicted = x + v * dt
            x = x + (v + velocity(predicted, t_j, 2 * i + 1)) * (dt / 2)
        return x

    times = torch.stack([torch.stack([t_i, t_j]) for t_i, t_j, _ in steps]).reshape(-1)
    return Sampler(settings, times, run)


def prepare_midpoint(settings: SamplerSettings) -> Sampler:
    """Per step: half = x + velocity(x, t_i) dt / 2; x += velocity(half, t_i + dt / 2) dt."""
    grid = time_grid(settings.name, settings.steps, settings.shift)
    steps = []
    for i in range(settings.steps):
        t_i = grid[i]
        dt = grid[i + 1] - t_i
        steps.append((t_i, t_i + dt / 2, float(dt / 2), float(dt)))

    def run(velocity: VelocityFn, noise: NoiseFn) -> torch.Tensor:
        x = noise()
        for i, (t_i, t_half, half_dt, dt) in enumerate(steps):
            half = x + velocity(x, t_i, 2 * i) * half_dt
            x = x + velocity(half, t_half, 2 * i + 1) * dt
        return x

    times = torch.stack([torch.stack([t_i, t_half]) for t_i, t_half, _, _ in steps]).reshape(-1)
    return Sampler(settings, times, run)


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


def prepare_dpm_solver_2m(settings: SamplerSettings, eta: float) -> Sampler:
    """Per step: x1 = x + velocity(x, t_i) (1 - t_i); x = keep x + data D (+ noise z but on the last step)."""
    grid = time_grid(settings.name, settings.steps, settings.shift)
    times = grid.tolist()
    steps = []
    for i in range(settings.steps):
        t_i, t_j = times[i], times[i + 1]
        keep, data, correction, noise_scale = dpm_coefficients(times[i - 1] if i else None, t_i, t_j, eta)
        add_noise = noise_scale > 0 and i + 1 < settings.steps
        steps.append((grid[i], 1 - t_i, keep, data, correction, noise_scale if add_noise else 0.0))

    def run(velocity: VelocityFn, noise: NoiseFn) -> torch.Tensor:
        x = noise()
        previous = None
        for i, (t_i, one_minus_t, keep, data, correction, noise_scale) in enumerate(steps):
            x1 = x + velocity(x, t_i, i) * one_minus_t
            estimate = x1 if correction == 0 else x1 + (x1 - previous) * correction
            x = x * keep + estimate * data
            if noise_scale:
                x = x + noise() * noise_scale
            previous = x1
        return x

    return Sampler(settings, grid[:-1], run)


def prepare_dpm2m(settings: SamplerSettings) -> Sampler:
    return prepare_dpm_solver_2m(settings, eta=0.0)


def prepare_dpm2m_sde(settings: SamplerSettings) -> Sampler:
    return prepare_dpm_solver_2m(settings, eta=settings.noise_level)


FEW_STEP_SOLVERS = {"heun": prepare_heun, "midpoint": prepare_midpoint, "dpm2m": prepare_dpm2m,
                    "dpm2m_sde": prepare_dpm2m_sde}
