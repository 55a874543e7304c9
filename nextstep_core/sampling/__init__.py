"""Sampling image tokens: the per-token samplers and the token loops.

- `settings`: `SamplerSettings`, the sampler names, time grids, and the `Sampler` type;
- `samplers`: the contract's samplers (1.0's Euler-Maruyama, 1.1's sde / cps / ode), their
  step tables prepared once per generation, and `prepare_sampler` for every sampler;
- `solvers`: this project's few-step samplers (heun, midpoint, dpm2m, dpm2m_sde);
- `guidance`: classifier-free guidance (branch combination, cfg schedules, velocity norm);
- `token_loop`: the fast token loop (the default); `reference_loop`: the contract's loop line
  by line, the baseline the fast one is tested and measured against.

Uses `engine` (the head, the prompt rows); never the other way round.
"""
