"""Float tolerances of the engine tests, derived from the arithmetic rather than tuned to one CPU.

Every bound here holds for any summation order, blocking, FMA use, instruction set (AVX2,
AVX-512, AMX) and thread count, so the tests pass on any x86 CPU. References: N. Higham,
Accuracy and Stability of Numerical Algorithms (2nd ed.), 3.1 (sums and products) and 1.9
(variance).
"""

from __future__ import annotations

import contextlib

import torch

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff

# Two float64 evaluations of the same formula that differ only in summation order, blocking or
# kernels agree to ~n * U64 = 1e-16 * n relative per operation. Amplified through a deep network
# or a whole autoregressive image (the float32 versions of these tests differ by ~1e-6 where
# U32 = 6e-8, so the amplification is ~10-100) that stays below ~1e-12 relative; 1e-9 leaves a
# factor >= 1000 on top. A real bug (a wrong position, mask, scale, bias or weight) moves the
# results by O(1e-3 .. 1) of their size: a million times this bound and more.
FLOAT64_AGREEMENT = 1e-9


def gamma(n: int, u: float = U32) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of n rounded operations in a chain."""
    assert n * u < 0.5
    return n * u / (1 - n * u)


def assert_float64_agree(a: torch.Tensor, b: torch.Tensor) -> None:
    """a and b: float64 results of the same formula computed in different orders (see FLOAT64_AGREEMENT)."""
    assert a.dtype == b.dtype == torch.float64
    assert a.shape == b.shape
    scale = torch.maximum(a.abs().max(), b.abs().max()).item()
    difference = (a - b).abs().max().item()
    assert difference <= FLOAT64_AGREEMENT * scale, (difference, scale)


@contextlib.contextmanager
def in_float64(*modules: torch.nn.Module):
    """Run `modules` in float64 for the block, then put them back to float32."""
    for module in modules:
        module.double()
    try:
        yield
    finally:
        for module in modules:
            module.float()


def layer_norm_statistics_bounds(x: torch.Tensor, dim: int, eps: float, u: float = U32):
    """Bounds on |mean(y)| and |var(y) - 1| (biased variance, both taken in float64) over `dim` of
    y = layer_norm(x, eps) computed in a float of unit roundoff u (without affine), per row.

    Exactly, mean(y) = 0 and var(y) = v / (v + eps), v = var(x), sigma = sqrt(v). Rounded, for
    n numbers in any summation order: the mean mu_hat is off by at most gamma_{n+1} mean|x|, in
    units of sigma s <= gamma_{n+1} (1 + |mu| / sigma) (mean|x| <= sigma + |mu|); the variance
    has relative error at most gamma_{2n+4} kappa + s^2, kappa = sqrt(1 + mu^2 / v) <= 1 + |mu| / sigma
    (two-pass: a sum of n nonnegative rounded squares of rounded differences; Welford-style
    updates: Chan, Golub and LeVeque's n kappa u; Higham, Accuracy and Stability, 1.9); eps and the
    reciprocal square root add 3u. So y_i = (y_exact_i - s)(1 + rho)(1 + theta_i), one common
    rho <= (variance error) / 2 + 3u and |theta_i| <= 2u + u^2 per element.
    mean(y): the common factor (1 + rho) keeps mean(y_exact) = 0 at 0, so only theta (mean|y| <= 1)
    and the shift s remain: <= 2u + s. var(y) - 1: eps / (v + eps) from eps, 2 (rho + 2u) from the
    scale, s^2 from the shift. A factor 2 on the rounding terms covers the O(u^2) products of
    (1 + theta) factors dropped here and the float64 statistics' own rounding (~1e-16).

    Returns (mean_bound, variance_bound), each shaped like x with `dim` removed.
    """
    x = x.double()
    n = x.shape[dim]
    mu, v = x.mean(dim), x.var(dim, unbiased=False)
    offset = mu.abs() / v.sqrt()
    shift = gamma(n + 1, u) * (1 + offset)
    rho = (gamma(2 * n + 4, u) * (1 + offset) + shift**2) / 2 + 3 * u
    mean_bound = 2 * (2 * u + shift)
    variance_bound = eps / (v + eps) + 2 * (2 * (rho + 2 * u) + shift**2)
    return mean_bound, variance_bound


def assert_layer_normalised(y: torch.Tensor, x: torch.Tensor, dim: int, eps: float = 1e-6, u: float = U32) -> None:
    """y, a layer norm of x over `dim`, has mean 0 and variance 1 within layer_norm_statistics_bounds."""
    mean_bound, variance_bound = layer_norm_statistics_bounds(x, dim, eps, u)
    y = y.double()
    mean_error = y.mean(dim).abs()
    variance_error = (y.var(dim, unbiased=False) - 1).abs()
    assert (mean_error <= mean_bound).all(), (mean_error.max(), mean_bound.min())
    assert (variance_error <= variance_bound).all(), (variance_error.max(), variance_bound.min())


@contextlib.contextmanager
def float64_rotary_tables(model: torch.nn.Module):
    """The decoder's rotary cos/sin tables in float64 for the block (transformers computes the
    angles position * frequency and their cos/sin in float32 whatever the model's dtype: ~u * position
    per entry, which would set the size of a float64 comparison between runs at different
    positions). The same frequencies (the float32 inv_freq buffer) and formula; a float32
    frequency times an integer position is exact in float64."""
    rotary = model.backbone.rotary_emb

    def forward(x, position_ids):
        angles = position_ids[..., None].double() * rotary.inv_freq.to(x.device, torch.float64)
        angles = torch.cat((angles, angles), dim=-1)
        return ((angles.cos() * rotary.attention_scaling).to(x.dtype),
                (angles.sin() * rotary.attention_scaling).to(x.dtype))

    rotary.forward = forward
    try:
        yield
    finally:
        del rotary.forward
