"""Which CPU product kernel `head.fast_product` (the head's `exact=False` path) uses, chosen by measurement.

The candidates are float32 evaluations of the same product x (rows, in) -> x @ weight.T + bias:
"linear" (F.linear itself), "columns" (addmm on the transpose, weight @ x.T) and "onednn"
(oneDNN's linear op, where the torch build has it). Which reads a weight fastest depends on the
CPU, its instruction set, the BLAS torch was built with, the row count and the thread count, so
nothing here looks at the CPU's make: the first time a (device, dtype, out, in, rows, threads)
shape is used in a process, each candidate that agrees with F.linear on that shape (within
float32 rounding, `agrees`) is run on a (rows, in) input against the real weight, a few warm-up
calls and then the least of a few timed calls, and the winner's name is cached for the process
(tens of milliseconds per shape for the head's weights). `kernel_choices()` reports the cache.
A weight read again and again would be timed from the CPU's caches where it fits them (the
head's 1536 x 1536 weights, 9 MB), while the head streams all its weights (~600 MB) from
memory, and kernels rank differently there; so before each timed call a scratch buffer twice the
size of the CPU's largest cache (`evict_caches`; 128 MiB where Linux does not say) is read,
which pushes the weight out, and every candidate is timed reading from memory.

Each kernel rounds differently (~1e-6 relative), so `exact=False` results can differ in their
last bits between processes that chose differently. NEXTSTEP_CPU_KERNEL=linear|columns|onednn
forces one kernel for every product that would be timed (no timing, the same rounding in every
process on the same CPU and thread count): for benchmarks, and for reproducible `exact=False`
results. Products that are never timed (weights under 2 MiB, other dtypes than float32, other
devices, linears without bias) keep F.linear whatever it says.
"""

from __future__ import annotations

import glob
import math
import os
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import NextStepError

Product = Callable[[torch.Tensor], torch.Tensor]  # x (rows, in) -> (rows, out)
ENV = "NEXTSTEP_CPU_KERNEL"
KERNEL_NAMES = ("linear", "columns", "onednn")
WARMUPS = 1  # untimed calls after the agreement check's call (which is the first warm-up)
REPEATS = 5  # then the least of this many timed calls
BUDGET_S = 0.02  # per candidate: fewer timed calls (at least one) once warm-ups and timed calls took this long
U32 = 2.0**-24  # float32 unit roundoff
CLOCK = time.perf_counter  # a module attribute so that tests can give a fake clock

Key = tuple[str, torch.dtype, int, int, int, int]  # device type, dtype, out, in, rows, threads
CHOICES: dict[Key, str] = {}  # the timed winners of this process
FORCED: dict[Key, str] = {}  # the shapes NEXTSTEP_CPU_KERNEL decided, for kernel_choices()


def forced_kernel(available: Iterable[str]) -> str | None:
    """NEXTSTEP_CPU_KERNEL's kernel (None when unset or empty); a name not among KERNEL_NAMES, or
    one this torch build lacks (not in `available`), is refused."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    available = tuple(available)
    if value not in KERNEL_NAMES:
        raise NextStepError(f"{ENV}={value!r} is not a product kernel: use one of {', '.join(KERNEL_NAMES)}, "
                            "or leave it unset to choose by timing")
    if value not in available:
        raise NextStepError(f"{ENV}={value}: this torch build has no working {value} kernel; "
                            f"use one of {', '.join(available)}")
    return value


def gamma(n: int, u: float = U32) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of n rounded operations in a chain
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1)."""
    return n * u / (1 - n * u)


def agreement_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, out) float64: the most by which two float32 evaluations of x @ weight.T + bias may
    differ, whatever their summation order, blocking, FMA use or thread count.

    Each lies within gamma_n (|b_j| + sum_k |w_jk| |x_ik|) of the exact value (n = in + 1 terms
    with the bias), so the two within twice that. By Cauchy-Schwarz sum_k |w_jk| |x_ik| <=
    ||w_j|| ||x_i||, which needs one read of the weight (its row norms) instead of a product of
    |weight|; it is looser by ~1.6x on random data. The norms are taken in float32: each is
    within a factor (1 - gamma_{in+1}) of the exact norm, covered by the last factor.
    """
    n = weight.shape[1] + 1
    norms = torch.linalg.vector_norm(weight, dim=1).double() * torch.linalg.vector_norm(x, dim=1).double()[:, None]
    magnitude = norms / (1 - gamma(n)) ** 2
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return 2 * gamma(n) * magnitude


def agrees(product: Product, x: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> bool:
    """Whether product(x) lies within `bound` of F.linear's `expected` (a NaN never does; a kernel
    that fails on this shape does not either)."""
    try:
        out = product(x)
    except RuntimeError:  # torch's error for an op or shape a kernel does not support
        return False
    return out.shape == expected.shape and bool(((out.double() - expected.double()).abs() <= bound).all())


def largest_cache_bytes(folder: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size of the CPU's largest cache in bytes, as Linux lists it (None elsewhere)."""
    sizes = []
    for entry in glob.glob(os.path.join(folder, "index*", "size")):
        try:
            text = open(entry).read().strip().upper()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
        if number.isdigit():
            sizes.append(int(number) * unit)
    return max(sizes, default=None)


SCRATCH: list[torch.Tensor] = []  # the eviction buffer, made on the first timing of the process


def evict_caches() -> None:
    """Read a float32 buffer twice the largest cache's size (128 MiB if unknown; 32-512 MiB),
    so that what a timed call reads next comes from memory (a few ms)."""
    if not SCRATCH:
        cache = largest_cache_bytes() or 64 * 2**20
        SCRATCH.append(torch.ones(min(max(2 * cache, 32 * 2**20), 512 * 2**20) // 4))
    SCRATCH[0].sum()


def time_product(product: Product, x: torch.Tensor) -> float:
    """Seconds of one call of product(x) reading its weight from memory (`evict_caches` before
    each call, untimed): WARMUPS untimed calls, then the least of up to REPEATS timed calls, fewer
    (at least one) once the timed and warm-up calls took BUDGET_S. Tens of milliseconds per
    candidate at most for the head's weights (a 28 MB weight is read in 1-3 ms)."""
    spent, best, timed = 0.0, math.inf, 0
    for call in range(WARMUPS + REPEATS):
        evict_caches()
        started = CLOCK()
        product(x)
        seconds = CLOCK() - started
        spent += seconds
        if call >= WARMUPS:
            best, timed = min(best, seconds), timed + 1
            if spent >= BUDGET_S:
                break
    return best


def fastest(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, candidates: dict[str, Product]) -> str:
    """The name of the quickest candidate for x (rows, in) against `weight`, among those whose
    output agrees with F.linear's (`agreement_bound`); "linear" is F.linear itself, so it always
    qualifies. Ties go to the earlier candidate."""
    generator = torch.Generator(device=weight.device).manual_seed(0)  # leaves the global RNG alone
    x = torch.randn(rows, weight.shape[1], generator=generator, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        expected = F.linear(x, weight, bias)
        bound = agreement_bound(x, weight, bias)
        seconds = {name: time_product(product, x) for name, product in candidates.items()
                   if agrees(product, x, expected, bound)}
    return min(seconds, key=seconds.get, default="linear")


def shape_key(weight: torch.Tensor, rows: int) -> Key:
    out_features, in_features = weight.shape
    return weight.device.type, weight.dtype, out_features, in_features, rows, torch.get_num_threads()


def choose_kernel(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, candidates: dict[str, Product]) -> str:
    """The name of the candidate to use for x (rows, in) against `weight`: NEXTSTEP_CPU_KERNEL's
    if it is set, else this process's cached choice for the shape, timed now if it has none."""
    key = shape_key(weight, rows)
    forced = forced_kernel(candidates)
    if forced is not None:
        FORCED[key] = forced
        return forced
    if key not in CHOICES:
        CHOICES[key] = fastest(weight, bias, rows, candidates)
    return CHOICES[key]


def describe(key: Key) -> str:
    """A key as "4608x1536 rows=20 float32 threads=2" (out x in; "cuda" etc. is added for other devices)."""
    device, dtype, out_features, in_features, rows, threads = key
    where = "" if device == "cpu" else f" {device}"
    return f"{out_features}x{in_features} rows={rows} {str(dtype).removeprefix('torch.')}{where} threads={threads}"


def kernel_choices() -> dict[str, str]:
    """This process's kernel per shape so far, a copy: the timed winners by name, and the shapes
    NEXTSTEP_CPU_KERNEL decided as "name (NEXTSTEP_CPU_KERNEL)"."""
    choices = {describe(key): name for key, name in CHOICES.items()}
    choices.update({describe(key): f"{name} ({ENV})" for key, name in FORCED.items()})
    return choices
