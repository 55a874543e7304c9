"""Time grids, step updates, guidance and normalisation against values worked out by hand."""

import math

import pytest
import torch
from bounds import assert_layer_normalised

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


def test_time_grid_1_0_is_even_up_to_0_96_then_shifted():
    assert time_grid("euler_maruyama", 5, 1.0).tolist() == pytest.approx([0.0, 0.24, 0.48, 0.72, 0.96], abs=1e-7)
    s = 3.2
    expected = [t / (s - (s - 1) * t) for t in (0.0, 0.24, 0.48, 0.72, 0.96)]
    assert time_grid("euler_maruyama", 5, s).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[1] == pytest.approx(0.24 / (3.2 - 2.2 * 0.24))


@pytest.mark.parametrize("name", ["sde", "cps", "ode"])
def test_time_grid_1_1_is_k_over_n_then_one(name):
    assert time_grid(name, 4, 1.0).tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    expected = [t / (2.0 - t) for t in (0.0, 0.25, 0.5, 0.75)] + [1.0]
    assert time_grid(name, 4, 2.0).tolist() == pytest.approx(expected, abs=1e-7)


class ScriptedNoise:
    """Hands out known noise vectors in order and counts the draws."""

    def __init__(self, rows=1, dim=3, seed=0):
        self.values = torch.randn(64, rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.values[self.calls - 1].clone()


def test_euler_maruyama_step_update_matches_hand_computation():
    # velocity v(x, t) = 2 - x * t: the update must be x + ((1+t) v - x) dt + sqrt(2 (1-t)) sqrt(dt) n
    noise = ScriptedNoise()
    settings = SamplerSettings("euler_maruyama", steps=4, shift=1.0)
    result = prepare_sampler(settings)(lambda x, t: 2 - x * t, noise)

    draws = ScriptedNoise().values
    grid = [0.0, 0.32, 0.64, 0.96]
    x = draws[0].clone()
    for i in range(3):
        t, dt = grid[i], grid[i + 1] - grid[i]
        v = 2 - x * t
        x = x + ((1 + t) * v - x) * dt + math.sqrt(2 * (1 - t)) * math.sqrt(dt) * draws[i + 1]
    x = x + (2 - x * 0.96) * 0.04
    assert noise.calls == 4  # initial + steps-1; none for the last Euler step
    torch.testing.assert_close(result, x, atol=1e-6, rtol=1e-6)


def point_mass_velocity(target):
    """The exact flow velocity towards one point: v = (target - x) / (1 - t)."""
    return lambda x, t: (target - x) / (1 - t)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_ode_lands_on_a_point_mass_exactly(steps):
    target = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    noise = ScriptedNoise()
    out = prepare_sampler(SamplerSettings("ode", steps=steps, shift=3.0))(point_mass_velocity(target), noise)
    torch.testing.assert_close(out, target)
    assert noise.calls == 1  # ode draws no step noise


def test_sde_step_update_matches_hand_computation():
    level, steps, shift = 0.8, 3, 1.5
    noise = ScriptedNoise()
    velocity = lambda x, t: torch.sin(x) + t  # noqa: E731
    out = prepare_sampler(SamplerSettings("sde", steps=steps, shift=shift, noise_level=level))(velocity, noise)

    draws = ScriptedNoise().values
    grid = [(k / steps) / (shift - (shift - 1) * (k / steps)) for k in range(steps)] + [1.0]
    x = draws[0].clone()
    for i in range(steps):
        ti, tj = grid[i], grid[i + 1]
        v = torch.sin(x) + ti
        x0, x1 = x - v * ti, x + v * (1 - ti)
        sigma, dt = 1 - ti, tj - ti
        denominator_sigma = grid[steps - 1] if sigma == 1 else sigma
        std = level * math.sqrt(sigma / (1 - denominator_sigma))
        x = (1 - tj) * x0 + tj * x1 - std**2 * dt / (2 * sigma) * x0 + std * math.sqrt(dt) * draws[i + 1]
    assert noise.calls == steps + 1
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)


def test_cps_step_update_matches_hand_computation():
    level, steps = 0.5, 4
    noise = ScriptedNoise()
    velocity = lambda x, t: 1.5 - 0.5 * x  # noqa: E731
    out = prepare_sampler(SamplerSettings("cps", steps=steps, noise_level=level))(velocity, noise)
    draws = ScriptedNoise().values
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    x = draws[0].clone()
    for i in range(steps):
        ti, tj = grid[i], grid[i + 1]
        v = 1.5 - 0.5 * x
        x0, x1 = x - v * ti, x + v * (1 - ti)
        std = (1 - tj) * math.sin(level * math.pi / 2)
        x = math.sqrt((1 - tj) ** 2 - std**2) * x0 + tj * x1 + std * draws[i + 1]
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)


def test_guidance_two_and_three_branches():
    v_cond, v_text, v_image = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 3.0]])
    two = combine_guidance(torch.cat([v_cond, v_text]), ["cond", "uncond_text"], cfg=3.0, cfg_img=1.0)
    torch.testing.assert_close(two, torch.tensor([[0.5 + 3 * 0.5, -1.0 + 3 * 3.0]]))
    three = combine_guidance(torch.cat([v_cond, v_text, v_image]), ["cond", "uncond_text", "uncond_image"], 7.5, 2.0)
    expected = v_image + 2.0 * (v_text - v_image) + 7.5 * (v_cond - v_text)
    torch.testing.assert_close(three, expected)
    assert three[0].tolist() == pytest.approx([0.0 + 2 * 0.5 + 7.5 * 0.5, 3.0 + 2 * -4.0 + 7.5 * 3.0])
    image_only = combine_guidance(torch.cat([v_cond, v_image]), ["cond", "uncond_image"], 1.0, 2.0)
    torch.testing.assert_close(image_only, v_image + 2.0 * (v_cond - v_image))
    torch.testing.assert_close(combine_guidance(v_cond, ["cond"], 9.0, 9.0), v_cond)


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
    torch.testing.assert_close(out, expected)


def test_cfg_schedules():
    assert guidance_scales(0, 4, 7.5, 2.0, "constant", rising=False) == (7.5, 2.0)
    # 1.0: falls from the full scale at k = 0 towards 1
    assert guidance_scales(0, 4, 7.5, 2.0, "linear", rising=False) == pytest.approx((7.5, 2.0))
    assert guidance_scales(1, 4, 7.5, 2.0, "linear", rising=False) == pytest.approx((1 + 6.5 * 3 / 4, 1 + 1.0 * 3 / 4))
    assert guidance_scales(3, 4, 7.5, 2.0, "linear", rising=False) == pytest.approx((1 + 6.5 / 4, 1.25))
    # 1.1: rises, never below half the scale
    assert guidance_scales(0, 4, 7.5, 2.0, "linear", rising=True) == pytest.approx((3.75, 1.0))
    assert guidance_scales(3, 4, 7.5, 2.0, "linear", rising=True) == pytest.approx((1 + 6.5 * 3 / 4, 1.75))
    with pytest.raises(NextStepError, match="cfg schedule 'cosine' is not one of constant, linear"):
        guidance_scales(0, 4, 7.5, 1.0, "cosine", rising=False)


def test_use_norm_gives_zero_mean_unit_variance_tokens():
    """Mean 0 and variance 1 within the float32 rounding of a layer norm of these 64 numbers
    (bounds.layer_norm_statistics_bounds: here ~1e-5 and ~4e-5). A wrong eps (1e-2: variance
    off by ~2e-4), a missing centring (mean 4 / 7) or scaling (variance 49) fails it."""
    tokens = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)) * 7 + 4
    assert_layer_normalised(normalize_token(tokens), tokens, dim=-1)


def test_velocity_norm_clamp():
    guided = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    cond = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = clamp_velocity_norm(guided, cond)
    assert out[0].norm().item() == pytest.approx(1.0, abs=1e-5)  # 5 -> clamped to |v_cond| = 1
    torch.testing.assert_close(out[1], guided[1])  # 0.5 < 1: untouched


def test_timestep_features_cos_half_first():
    t = torch.tensor([0.0, 0.5])
    f = timestep_features(t)
    assert f.shape == (2, 256)
    torch.testing.assert_close(f[0, :128], torch.ones(128))
    torch.testing.assert_close(f[0, 128:], torch.zeros(128))
    assert f[1, 1].item() == pytest.approx(math.cos(0.5 * math.exp(-math.log(10000) / 128)), abs=1e-6)


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
