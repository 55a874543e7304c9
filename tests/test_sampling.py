"""Time grids, step updates, guidance and normalisation against values worked out by hand."""

import math

import pytest
import torch
from bounds import U32, U64, assert_float64_agree, assert_layer_normalised, gamma

from nextstep_core.engine.head import FlowNet, timestep_features
from nextstep_core.errors import NextStepError
from nextstep_core.sampling.guidance import (
    check_branches,
    clamp_velocity_norm,
    combine_guidance,
    guidance_scales,
)
from nextstep_core.sampling.reference_loop import sample_token
from nextstep_core.sampling.samplers import normalize_token, prepare_sampler
from nextstep_core.sampling.settings import SamplerSettings, time_grid


def shifted_grid_bound(shift):
    """How far a float32 grid point (all lie in [0, 1]) may be from the exact k h / (s - (s - 1) k h), s >= 1.
    torch's linspace is within gamma_4 of k h (the end rounded to float32, the step quotient, its product with k
    and a sum: it counts from whichever end is nearer). The shift t / (s - (s - 1) t) has slope
    s / (s - (s - 1) t)^2 <= s on [0, 1] (the denominator is >= 1), so that becomes s gamma_4; its own rounding
    (s and s - 1 to float32, a product, a difference of terms <= s over a denominator >= 1, a quotient) is at
    most (4 s + 1) u <= s gamma_5 relative, of a point <= 1."""
    return 2 * shift * gamma(5)


def test_time_grid_1_0_is_even_up_to_0_96_then_shifted():
    """Within shifted_grid_bound (shift 1: gamma_5 * 2 = 6e-7; 3.2: 2e-6) of the exact points; a wrong end,
    count or shift moves them by >= 1e-2."""
    even = [0.0, 0.24, 0.48, 0.72, 0.96]
    assert time_grid("euler_maruyama", 5, 1.0).tolist() == pytest.approx(even, rel=0, abs=shifted_grid_bound(1.0))
    s = 3.2
    expected = [t / (s - (s - 1) * t) for t in even]
    assert time_grid("euler_maruyama", 5, s).tolist() == pytest.approx(expected, rel=0, abs=shifted_grid_bound(s))
    # the same number written two ways in float64: 3.2 - 1 and 2.2 differ by one rounding, then 3 more
    assert expected[1] == pytest.approx(0.24 / (3.2 - 2.2 * 0.24), rel=gamma(8, U64), abs=0)


@pytest.mark.parametrize("name", ["sde", "cps", "ode"])
def test_time_grid_1_1_is_k_over_n_then_one(name):
    """Exact: linspace(0, 1, 5) is k / 4 (a step of 1/4 and its multiples, all dyadic), shift 1 divides by
    1 - 0 t = 1, and shift 2 by 2 - t (exact for these t), so each point is one correctly rounded float32
    quotient: the float32 rounding of t / (2 - t)."""
    assert time_grid(name, 4, 1.0).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    expected = [t / (2.0 - t) for t in (0.0, 0.25, 0.5, 0.75)] + [1.0]
    assert torch.equal(time_grid(name, 4, 2.0), torch.tensor(expected, dtype=torch.float32))


class ScriptedNoise:
    """Hands out known noise vectors in order and counts the draws."""

    def __init__(self, rows=1, dim=3, seed=0):
        self.values = torch.randn(64, rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.values[self.calls - 1].clone()


def test_euler_maruyama_step_update_matches_hand_computation():
    """velocity v(x, t) = 2 - x t: the update must be x + ((1 + t) v - x) dt + sqrt(2 (1 - t)) sqrt(dt) n.

    The sampler works out its per-step scalars in float32 from the float32 grid and writes the drift as
    v + (1 - t)(t v - x) / variance, variance = (1 - t)^2 + t (1 - t), which is 1 - t, but in float32 only
    within a few u32. The hand computation takes the same float32 values (the grid, dt, 1 - t, variance,
    sqrt(2 (1 - t)), sqrt(dt)); what is left is float64 arithmetic on the float64 state in another order, so
    the two agree to float64 rounding (assert_float64_agree). A dropped term, a wrong sqrt or t moves the
    result by >= 1e-2 of its size, a float32 rounding of the state by ~1e-7: both far outside that."""
    noise = ScriptedNoise()
    settings = SamplerSettings("euler_maruyama", steps=4, shift=1.0)
    result = prepare_sampler(settings)(lambda x, t, index: 2 - x * t, noise)

    draws = ScriptedNoise().values
    grid = time_grid("euler_maruyama", 4, 1.0)  # float32: 0, 0.32, 0.64, 0.96 rounded
    x = draws[0].clone()
    for i in range(3):
        t, t_next = grid[i], grid[i + 1]
        dt = t_next - t  # float32 scalars, as the sampler's
        drift_factor = (1 - t).item() / ((1 - t) ** 2 + t * (1 - t)).item()  # (1 - t) / variance: 1 in exact arithmetic
        diffusion, sqrt_dt = torch.sqrt(2 * (1 - t)).item(), torch.sqrt(dt).item()
        t, dt = t.item(), dt.item()
        v = 2 - x * t
        x = x + (v + drift_factor * (t * v - x)) * dt + diffusion * sqrt_dt * draws[i + 1]
    x = x + (2 - x * grid[3].item()) * 0.04
    assert noise.calls == 4  # initial + steps-1; none for the last Euler step
    assert_float64_agree(result, x)


def point_mass_velocity(target):
    """The exact flow velocity towards one point: v = (target - x) / (1 - t)."""
    return lambda x, t, index: (target - x) / (1 - t)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_ode_lands_on_a_point_mass_exactly(steps):
    """The last step (t_j = 1: coefficients 1 - t_j = 0 and t_j = 1, so x = 0 x0 + 1 x1 = x1 exactly) is
    x1 = x + ((target - x) / m) m with the same float32 m = 1 - t_i in the velocity and the sampler: in float64
    the difference, quotient, product and sum round 4 times, so x1 is within gamma_4(u64) (|target| + |target - x|)
    of the target, x the last state the velocity saw. A float32 rounding anywhere on the way would be ~1e-7."""
    target = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    noise = ScriptedNoise()
    seen = []

    def velocity(x, t, index):
        seen.append(x)
        return point_mass_velocity(target)(x, t, index)

    out = prepare_sampler(SamplerSettings("ode", steps=steps, shift=3.0))(velocity, noise)
    bound = gamma(4, U64) * (target.abs() + (target - seen[-1]).abs())
    assert ((out - target).abs() <= bound).all()
    assert noise.calls == 1  # ode draws no step noise


def test_sde_step_update_matches_hand_computation():
    """The sde step x = (1 - t_j) x0 + t_j x1 - std^2 dt / (2 sigma) x0 + std sqrt(dt) n, its scalars in float32
    from the float32 grid as the sampler computes them, the state in float64: as in the euler_maruyama test,
    what is left is float64 rounding in another order (assert_float64_agree)."""
    level, steps, shift = 0.8, 3, 1.5
    noise = ScriptedNoise()
    velocity = lambda x, t, index: torch.sin(x) + t  # noqa: E731
    out = prepare_sampler(SamplerSettings("sde", steps=steps, shift=shift, noise_level=level))(velocity, noise)

    draws = ScriptedNoise().values
    grid = time_grid("sde", steps, shift)  # float32: (k / steps) / (shift - (shift - 1) k / steps), then 1
    x = draws[0].clone()
    for i in range(steps):
        ti, tj = grid[i], grid[i + 1]
        sigma, dt = 1 - ti, tj - ti  # float32 scalars, as the sampler's
        denominator_sigma = grid[steps - 1] if sigma == 1 else sigma
        std = level * torch.sqrt(sigma / (1 - denominator_sigma))
        drift = (std**2 * dt / (2 * sigma)).item()
        noise_scale = (std * torch.sqrt(dt)).item()
        one_minus_ti, one_minus_tj, ti, tj = (1 - ti).item(), (1 - tj).item(), ti.item(), tj.item()
        v = torch.sin(x) + ti
        x0, x1 = x - v * ti, x + v * one_minus_ti
        x = one_minus_tj * x0 + tj * x1 - drift * x0 + noise_scale * draws[i + 1]
    assert noise.calls == steps + 1
    assert_float64_agree(out, x)


def test_cps_step_update_matches_hand_computation():
    """The cps step x = sqrt((1 - t_j)^2 - std^2) x0 + t_j x1 + std n, std = (1 - t_j) sin(level pi / 2), its
    scalars in float32 as the sampler computes them (the grid k / 4 is exact), the state in float64: float64
    rounding in another order is all that is left (assert_float64_agree)."""
    level, steps = 0.5, 4
    noise = ScriptedNoise()
    velocity = lambda x, t, index: 1.5 - 0.5 * x  # noqa: E731
    out = prepare_sampler(SamplerSettings("cps", steps=steps, noise_level=level))(velocity, noise)
    draws = ScriptedNoise().values
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    x = draws[0].clone()
    for i in range(steps):
        ti, tj = grid[i], grid[i + 1]
        one_minus_tj = torch.tensor(1 - tj)  # float32, exact
        std = one_minus_tj * math.sin(level * math.pi / 2)  # float32, as the sampler's
        keep = torch.sqrt(one_minus_tj**2 - std**2).item()
        v = 1.5 - 0.5 * x
        x0, x1 = x - v * ti, x + v * (1 - ti)
        x = keep * x0 + tj * x1 + std.item() * draws[i + 1]
    assert_float64_agree(out, x)


def test_guidance_two_and_three_branches():
    """Exact (torch.equal): every value, scale, difference, product and sum here is a small dyadic rational
    (0.5, 3.0, 7.5, -4.0, 22.5, ...: a few significant bits), so float32 holds each result exactly and the
    combination gives the same number in any order."""
    v_cond, v_text, v_image = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 3.0]])
    two = combine_guidance(torch.cat([v_cond, v_text]), ["cond", "uncond_text"], cfg=3.0, cfg_img=1.0)
    assert torch.equal(two, torch.tensor([[0.5 + 3 * 0.5, -1.0 + 3 * 3.0]]))
    three = combine_guidance(torch.cat([v_cond, v_text, v_image]), ["cond", "uncond_text", "uncond_image"], 7.5, 2.0)
    expected = v_image + 2.0 * (v_text - v_image) + 7.5 * (v_cond - v_text)
    assert torch.equal(three, expected)
    assert three[0].tolist() == [0.0 + 2 * 0.5 + 7.5 * 0.5, 3.0 + 2 * -4.0 + 7.5 * 3.0]
    image_only = combine_guidance(torch.cat([v_cond, v_image]), ["cond", "uncond_image"], 1.0, 2.0)
    assert torch.equal(image_only, v_image + 2.0 * (v_cond - v_image))
    assert torch.equal(combine_guidance(v_cond, ["cond"], 9.0, 9.0), v_cond)


def test_guidance_branches_must_come_in_the_prompt_rows_order():
    text, image = "uncond_text", "uncond_image"
    for branches in (["cond"], ["cond", text], ["cond", image], ["cond", text, image]):
        check_branches(branches)
    for branches in ([], [text], ["cond", image, text], ["cond", "cond"], [text, "cond"]):
        with pytest.raises(ValueError, match="not in the order"):
            check_branches(branches)


def test_guidance_rows_are_branch_major_for_several_images():
    v = torch.arange(12.0).reshape(6, 2)  # 2 branches x 3 images
    out = combine_guidance(v, ["cond", "uncond_text"], cfg=2.0, cfg_img=1.0)
    expected = torch.tensor([[6.0 + 2 * (0 - 6), 7.0 + 2 * (1 - 7)], [8.0 - 12, 9.0 - 12], [10.0 - 12, 11.0 - 12]])
    assert torch.equal(out, expected)  # small integers throughout: exact in float32


def test_cfg_schedules():
    """Exact: the scales, k / 4 and every result are short dyadic rationals (7.5, 4.875, 1.25...), exact in float64."""
    assert guidance_scales(0, 4, 7.5, 2.0, "constant", rising=False) == (7.5, 2.0)
    # 1.0: falls from the full scale at k = 0 towards 1
    assert guidance_scales(0, 4, 7.5, 2.0, "linear", rising=False) == (7.5, 2.0)
    assert guidance_scales(1, 4, 7.5, 2.0, "linear", rising=False) == (1 + 6.5 * 3 / 4, 1 + 1.0 * 3 / 4)
    assert guidance_scales(3, 4, 7.5, 2.0, "linear", rising=False) == (1 + 6.5 / 4, 1.25)
    # 1.1: rises, never below half the scale
    assert guidance_scales(0, 4, 7.5, 2.0, "linear", rising=True) == (3.75, 1.0)
    assert guidance_scales(3, 4, 7.5, 2.0, "linear", rising=True) == (1 + 6.5 * 3 / 4, 1.75)
    with pytest.raises(NextStepError, match="cfg schedule 'cosine' is not one of constant, linear"):
        guidance_scales(0, 4, 7.5, 1.0, "cosine", rising=False)


def test_use_norm_gives_zero_mean_unit_variance_tokens():
    """Mean 0 and variance 1 within the float32 rounding of a layer norm of these 64 numbers
    (bounds.layer_norm_statistics_bounds: here ~1e-5 and ~4e-5). A wrong eps (1e-2: variance
    off by ~2e-4), a missing centring (mean 4 / 7) or scaling (variance 49) fails it."""
    tokens = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)) * 7 + 4
    assert_layer_normalised(normalize_token(tokens), tokens, dim=-1)


def test_velocity_norm_clamp():
    """Row 0: |v| = 5 (3^2 + 4^2 and its sqrt are exact) is scaled by |v_cond| / (|v| + 1e-6) = 1 / (5 + 1e-6), so
    its norm is exactly 5 / (5 + 1e-6). Rounded in float32, each element carries <= 4 roundings (1e-6 to
    float32, the sum, the quotient, the product), its square 9, the sum of the two 10; the sqrt halves those and
    adds its own: <= 6 u, within gamma_10 relative. A missing clamp (5) or a clamp to
    the wrong norm is off by O(1). Row 1: 0.5 < 1, the ratio clamps to exactly 1.0 and 1.0 v = v."""
    guided = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    cond = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = clamp_velocity_norm(guided, cond)
    assert out[0].norm().item() == pytest.approx(5 / (5 + 1e-6), rel=gamma(10), abs=0)  # clamped to |v_cond| = 1
    assert torch.equal(out[1], guided[1])  # untouched


def test_timestep_features_cos_half_first():
    """t = 0: every argument is 0 * freq = 0, and cos 0 = 1, sin 0 = 0 exactly. t = 0.5, frequency 1:
    freq = exp(-log(10000) / 128) with log(10000) rounded to float32 (moving exp's argument by <= 9.3 u / 128)
    and exp within 1 ulp (<= 2 u relative): <= 2.1 u relative; the argument a = 0.5 freq (exact halving); then
    cos moves by <= |sin a| a 2.1 u, and its own 1 ulp adds <= 2 u. Twice that sum allows exp and cos within
    2 ulp (Sleef's u10 functions, which torch uses, and glibc's are within 1). A wrong frequency index or
    period, or sin for cos, is off by >= 1e-3."""
    t = torch.tensor([0.0, 0.5])
    f = timestep_features(t)
    assert f.shape == (2, 256)
    assert torch.equal(f[0, :128], torch.ones(128))
    assert torch.equal(f[0, 128:], torch.zeros(128))
    a = 0.5 * math.exp(-math.log(10000) / 128)
    bound = 2 * (abs(math.sin(a)) * a * 2.1 * U32 + 2 * U32)
    assert f[1, 1].item() == pytest.approx(math.cos(a), rel=0, abs=bound)


def test_sample_token_uses_one_head_batch_and_counts_draws():
    torch.manual_seed(0)
    net = FlowNet(token_dim=8, cond_dim=6, dim=16, layers=2)
    calls = []
    original = net.forward_embedded

    def counting(x, y):
        calls.append(x.shape[0])
        return original(x, y)

    net.forward_embedded = counting
    condition = torch.randn(2 * 3, 6)  # 2 branches x 3 images
    noise = ScriptedNoise(rows=3, dim=8)
    settings = SamplerSettings("euler_maruyama", steps=5)
    token = sample_token(net, condition, branches=["cond", "uncond_text"], cfg=3.0, cfg_img=1.0,
                         sampler=prepare_sampler(settings), noise=lambda: noise().float(), state_dtype=torch.float32)
    assert token.shape == (3, 8)
    assert calls == [6] * 5  # steps evaluations, each on every branch at once
    assert noise.calls == 5


def test_sampler_settings_errors():
    with pytest.raises(NextStepError, match="steps 0 must be a whole number >= 1"):
        SamplerSettings("sde", steps=0).validate()
    with pytest.raises(NextStepError, match="sampler 'rk4' is not one of"):
        SamplerSettings("rk4").validate()
    with pytest.raises(NextStepError, match="shift -1"):
        SamplerSettings("sde", shift=-1).validate()
