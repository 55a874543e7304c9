"""The fast token loop (sampling/token_loop.py, the default) against the contract's loop
(sampling/reference_loop.py), and the few-step samplers (sampling/solvers.py)."""

import pytest
import torch
import torch.nn.functional as F
from bounds import U32, assert_float64_agree, gamma, in_float64
from PIL import Image

from nextstep_core.engine.head import FlowNet, TokenHead, exact_product, fast_product
from nextstep_core.errors import NextStepError
from nextstep_core.sampling.guidance import guide
from nextstep_core.sampling.samplers import head_evaluations, prepare_sampler
from nextstep_core.sampling.settings import FEW_STEP_SAMPLERS, RECOMMENDED_STEPS, SAMPLERS, SamplerSettings
from nextstep_core.sampling.token_step import GuidedVelocity

PROMPTS = ["a red circle", "two small blue squares at the top"]


def both_loops(pipe, prompt, **kwargs):
    reference = pipe.generate(prompt, loop="reference", decode=False, **kwargs).tokens
    fast = pipe.generate(prompt, decode=False, **kwargs).tokens
    return reference, fast


@pytest.mark.parametrize("pipe_name,sampler", [("pipe_1_0", "auto"), ("pipe_1_1", "auto"), ("pipe_1_1", "cps"),
                                               ("pipe_1_1", "ode")])
def test_fast_loop_gives_the_reference_tokens_text_to_image(pipe_name, sampler, request):
    pipe = request.getfixturevalue(pipe_name)
    reference, fast = both_loops(pipe, PROMPTS, width=48, height=16, num_images=2, cfg=7.5, sampler=sampler,
                                 steps=4, seed=11, cfg_schedule="linear")
    assert torch.equal(reference, fast)


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
def test_fast_loop_gives_the_reference_tokens_editing(pipe_name, request):
    pipe = request.getfixturevalue(pipe_name)
    image = Image.new("RGB", (32, 16), (200, 40, 40))
    reference, fast = both_loops(pipe, "<image> make it blue", image=image, cfg=5.0, cfg_img=2.0, steps=4, seed=3,
                                 num_images=2)
    assert torch.equal(reference, fast)


def test_fast_loop_velocity_norm_and_few_step_samplers_match_the_reference(pipe_1_1):
    reference, fast = both_loops(pipe_1_1, PROMPTS[0], width=32, height=16, cfg=4.0, steps=4, velocity_norm=True)
    assert torch.equal(reference, fast)
    for sampler in FEW_STEP_SAMPLERS:
        reference, fast = both_loops(pipe_1_1, PROMPTS[0], width=32, height=16, cfg=4.0, sampler=sampler, steps=3)
        assert torch.equal(reference, fast), sampler


def test_batched_modulations_stay_within_float_rounding(pipe_1_0):
    """exact=False computes all steps' AdaLN modulations in one product; exact=True one per step.
    Same formulas, other summation blocking: in float64 the whole image's tokens agree to
    bounds.FLOAT64_AGREEMENT (1e-9 of their size), while a modulation taken from the wrong step or
    row moves them by O(0.1). (In float32 they differ by ~1e-6, a size set by the CPU's kernels.)"""
    kw = dict(width=32, height=16, cfg=7.5, steps=8, decode=False)
    with in_float64(pipe_1_0.model):
        reference = pipe_1_0.generate(PROMPTS[0], **kw).tokens
        batched = pipe_1_0.generate(PROMPTS[0], exact=False, **kw).tokens
    assert_float64_agree(batched, reference)


def test_token_head_step_equals_the_net():
    torch.manual_seed(0)
    net = FlowNet(token_dim=8, cond_dim=6, dim=16, layers=2)
    times = torch.tensor([0.0, 0.3, 0.9])
    condition, x = torch.randn(4, 6), torch.randn(4, 8)
    head = TokenHead(net, times, rows=4, dtype=torch.float32)
    head.set_condition(condition)
    for step, t in enumerate(times):
        assert torch.equal(head.velocity(x, step), net(x, t.expand(4), condition))


def large_linear(seed=0):
    """A float32 nn.Linear above head.SMALL_WEIGHT_BYTES (2 MiB; this one is 3 MiB), so
    fast_product may swap its kernel."""
    torch.manual_seed(seed)
    return torch.nn.Linear(1024, 768)


def float32_product_error_bound(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """Per output, the most by which ANY float32 evaluation of b + sum_i w_i x_i can differ from
    the exact value, whatever its summation order, blocking or use of FMA (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1): gamma_n (|b| + sum_i |w_i| |x_i|), with
    gamma_n = n u / (1 - n u), u = 2^-24 and n = in_features + 1 terms. It depends on the data
    only, not on the CPU's kernels, thread count or instruction set."""
    magnitude = x.double().abs() @ linear.weight.double().abs().T + linear.bias.double().abs()
    return gamma(linear.in_features + 1) * magnitude


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 20])
def test_fast_products_equal_f_linear_within_float_rounding(rows):
    """fast_product's kernel (timed per shape; every candidate: test_kernel_choice.py) and F.linear
    are float32 evaluations of the same products, so each lies within the rounding bound of the
    exact (float64) value, and the two within twice that of each other.
    A wrong product (a transposed or misaligned weight, a lost bias) misses by O(|y|) ~ 1, about
    a thousand times the bound here (~1e-3)."""
    linear = large_linear()
    x = torch.randn(rows, 1024)
    with torch.no_grad():
        out, expected = fast_product(linear, rows)(x), F.linear(x, linear.weight, linear.bias)
        exact64 = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert out.shape == expected.shape == (rows, 768)
    bound = float32_product_error_bound(x, linear)
    assert bound.max() < 2e-3
    assert ((out.double() - exact64).abs() <= bound).all()
    assert ((expected.double() - exact64).abs() <= bound).all()
    assert ((out.double() - expected.double()).abs() <= 2 * bound).all()


def test_exact_product_is_f_linear_bit_for_bit():
    torch.manual_seed(1)
    with_bias, without_bias = torch.nn.Linear(48, 80), torch.nn.Linear(48, 80, bias=False)
    with torch.no_grad():
        for rows in (1, 2, 6, 20):
            x = torch.randn(rows, 48)
            for linear in (with_bias, without_bias):
                assert torch.equal(exact_product(linear)(x), F.linear(x, linear.weight, linear.bias))
        x3 = torch.randn(2, 3, 48)  # other ranks fall back to F.linear itself
        assert torch.equal(exact_product(with_bias)(x3), F.linear(x3, with_bias.weight, with_bias.bias))


# The most by which one float32 evaluation of the head may miss the float64 value, as a multiple
# of another float32 evaluation's miss on the same data (see the test below).
SAME_NET_ROUNDING_FACTOR = 8


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_batched_token_head_with_fast_products_stays_within_float_rounding(rows):
    """The fast kernels exist in float32 only, so the head runs in float32 and is measured against
    the float64 net on the same weights and inputs. No useful a-priori bound exists through two
    AdaLN blocks of width 1024, so the yardstick is the float32 net's own miss on the same data:
    both are float32 evaluations of the same formulas, differing only in how each product's sum
    is ordered and blocked (each product within the same gamma_n bound whatever the kernel,
    test_fast_products_equal_f_linear_within_float_rounding), propagated through the same
    layers; so their misses are of one size. Measured max ratio over 15 seeds x 4 row counts x 3
    steps: 1.7 (AVX-512/AMX, 2 threads), 2.3 (1 thread), 2.0 (AVX2 kernels); the factor 8 leaves
    3.5x on top. The floor u max|v| (one rounding of the output) keeps the bound above zero.
    The bound is ~4e-6 on outputs ~1.5; a lost bias, a wrong step's modulation or a misaligned
    weight moves them by O(0.1-1)."""
    torch.manual_seed(0)
    net = FlowNet(token_dim=16, cond_dim=32, dim=1024, layers=2)  # 4 MiB block weights: fast kernels
    net64 = FlowNet(token_dim=16, cond_dim=32, dim=1024, layers=2).double()
    net64.load_state_dict(net.state_dict())
    times = torch.tensor([0.0, 0.4, 0.8])
    condition, x = torch.randn(rows, 32), torch.randn(rows, 16)
    head = TokenHead(net, times, rows=rows, dtype=torch.float32, exact=False)
    head.set_condition(condition)
    with torch.no_grad():
        for step, t in enumerate(times):
            fast, expected = head.velocity(x, step), net(x, t.expand(rows), condition)
            exact64 = net64(x.double(), t.expand(rows).double(), condition.double())
            float32_miss = (expected.double() - exact64).abs().max().item()
            bound = SAME_NET_ROUNDING_FACTOR * max(float32_miss, U32 * exact64.abs().max().item())
            assert (fast.double() - exact64).abs().max().item() <= bound
            assert (fast - expected).abs().max().item() <= bound + float32_miss  # the triangle inequality


@pytest.mark.parametrize("name", SAMPLERS)
def test_evaluation_times_are_the_times_the_sampler_asks_for(name):
    settings = SamplerSettings(name, steps=5, shift=2.0)
    seen = []

    def velocity(x, t, index):
        seen.append((float(t), index))
        return -x

    sampler = prepare_sampler(settings)
    sampler(velocity, lambda: torch.ones(1, 3))
    times = sampler.evaluation_times.tolist()
    # each call says which evaluation it is, and its time is that evaluation's time
    assert seen == [(t, i) for i, t in enumerate(times)]
    assert len(seen) == head_evaluations(settings)


def test_guided_velocity_uses_the_index_it_is_given_not_its_call_count():
    """GuidedVelocity evaluates the head at the evaluation the sampler names: asked for index 2
    first (and again), it gives the guided net at times[2] each time, as the head itself does."""
    torch.manual_seed(0)
    net = FlowNet(token_dim=8, cond_dim=6, dim=16, layers=2)
    times = torch.tensor([0.0, 0.3, 0.9])
    head = TokenHead(net, times, rows=2, dtype=torch.float32)
    velocity = GuidedVelocity(head, ["cond", "uncond_text"], SamplerSettings("ode", steps=3), torch.float32)
    velocity.start_token(torch.randn(2, 6), cfg=3.0, cfg_img=1.0)
    x = torch.randn(1, 8)
    for index in (2, 2, 0):
        expected = guide(head.velocity(x.expand(2, 8), index), ["cond", "uncond_text"], 3.0, 1.0, False)
        assert torch.equal(velocity(x, times[index], index), expected)


def point_mass_velocity(target):
    return lambda x, t, index: (target - x) / (1 - t)


@pytest.mark.parametrize("name", ["midpoint", "dpm2m", "dpm2m_sde"])  # heun evaluates at t = 1, undefined here
def test_few_step_samplers_land_on_a_point_mass(name):
    target = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    draws = iter(torch.randn(20, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    out = prepare_sampler(SamplerSettings(name, steps=4, shift=2.0))(point_mass_velocity(target), lambda: next(draws))
    # float64 rounding only: the last step starts at t = 0.6 (float32), where 1 - t is exact in float32 (t >= 1/2),
    # so it is x + ((target - x) / m) m' with m = m' (dpm2m's keep 0 and data 1 are exact; midpoint's half time
    # (1 + t) / 2 is exact too, t's last bit being even, so dt / (1 - t_half) = 2): <= 8 float64 roundings of
    # numbers of size <= 5 (the target <= 2, the states <= 2.4, their differences): gamma_8(u64) * 5 = 4e-15; a
    # float32 rounding anywhere on the way would be ~1e-7
    assert (out - target).abs().max().item() <= gamma(8, 2.0**-53) * 5


def gaussian_velocity(mu, s):
    """Exact flow velocity for data N(mu, s^2) from noise N(0, 1): its ODE maps x0 to mu + s x0."""
    return lambda x, t, index: mu + (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) ** 2) * (x - t * mu)


def ode_error(name, steps):
    x0 = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    out = prepare_sampler(SamplerSettings(name, steps=steps))(gaussian_velocity(1.5, 1.0), lambda: x0.clone())
    return (out - (1.5 + x0)).abs().max().item()


def test_higher_order_solvers_beat_euler_at_equal_head_evaluations():
    euler = ode_error("ode", 8)
    assert ode_error("heun", 4) < euler / 3  # 8 evaluations
    assert ode_error("midpoint", 4) < euler / 3  # 8 evaluations
    assert ode_error("dpm2m", 8) < euler / 3  # 8 evaluations
    assert ode_error("heun", 8) < ode_error("heun", 4) / 3  # second order: error shrinks ~4x per halving


def test_dpm2m_sde_with_zero_noise_is_dpm2m():
    draws = torch.randn(30, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    velocity = gaussian_velocity(0.5, 0.7)
    quiet = prepare_sampler(SamplerSettings("dpm2m_sde", steps=6, noise_level=0.0))(velocity, iter(draws).__next__)
    plain = prepare_sampler(SamplerSettings("dpm2m", steps=6))(velocity, iter(draws).__next__)
    # exact: noise level 0 is dpm2m's eta = 0, so both run the same coefficients (q^0 = 1, noise scale 0: no draw
    # added) in the same operations and order on the same float64 state
    assert torch.equal(quiet, plain)


def test_few_step_defaults_and_errors(pipe_1_1):
    for name, steps in RECOMMENDED_STEPS.items():
        assert pipe_1_1.sampler_settings(name).steps == steps
    assert head_evaluations(SamplerSettings("heun", steps=4)) == 8
    assert head_evaluations(SamplerSettings("midpoint", steps=4)) == 8
    with pytest.raises(NextStepError, match="loop 'quick' is not one of fast, reference"):
        pipe_1_1.generate("a circle", width=32, height=32, loop="quick")
    with pytest.raises(NextStepError, match="sampler 'rk4' is not one of .*heun"):
        pipe_1_1.generate("a circle", width=32, height=32, sampler="rk4")


def test_cli_offers_every_sampler():
    from nextstep_core.cli import build_parser

    for name in SAMPLERS:
        args = build_parser().parse_args(["generate", "--prompt", "x", "--out", "o.png", "--sampler", name])
        assert args.sampler == name


def test_small_models_sample_on_one_thread_and_give_the_count_back(pipe_1_1):
    """Tiny/demo-sized weights: the token loop runs on one CPU thread (waking a second one costs
    more than the work); the caller's thread count comes back, also after an interrupt."""
    from nextstep_core.pipeline import GenerationInterrupted
    from nextstep_core.sampling.token_loop import runs_best_on_one_thread

    assert runs_best_on_one_thread(pipe_1_1.model, torch.device("cpu"))
    assert not runs_best_on_one_thread(pipe_1_1.model, torch.device("cuda"))
    big = FlowNet(token_dim=64, cond_dim=64, dim=1024, layers=1)  # 4 MiB matrices: worth two threads
    original_net = pipe_1_1.model.image_head.net
    pipe_1_1.model.image_head.net = big
    try:
        assert not runs_best_on_one_thread(pipe_1_1.model, torch.device("cpu"))
    finally:
        pipe_1_1.model.image_head.net = original_net
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        pipe_1_1.generate("a red circle", width=32, height=16, steps=2, decode=False,
                          callback=lambda done, total, tokens: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        with pytest.raises(GenerationInterrupted):
            pipe_1_1.generate("a red circle", width=32, height=16, steps=2, decode=False,
                              callback=lambda done, total, tokens: False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
