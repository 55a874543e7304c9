"""The CPU product kernel choice of `exact=False` (engine/kernels.py, head.fast_product): timed per
shape and cached per process, only candidates that agree with F.linear, NEXTSTEP_CPU_KERNEL's
override, F.linear untimed where the rules say so, and the speed benchmark's record of it.

No timing is asserted: the tests give fake timings (or a fake clock) that decide the winner."""

import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bounds import gamma

import nextstep_core.engine.head as head_module
import nextstep_core.engine.kernels as kernels
from nextstep_core.engine.head import addmm_rows, candidate_products, column_linear, fast_product, onednn_linear
from nextstep_core.engine.kernels import ENV, agreement_bound, choose_kernel, describe, kernel_choices, shape_key
from nextstep_core.errors import NextStepError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import speed  # noqa: E402

KERNEL_FUNCTIONS = {"linear": addmm_rows, "columns": column_linear, "onednn": onednn_linear}
AVAILABLE = [name for name in KERNEL_FUNCTIONS if head_module.ONEDNN or name != "onednn"]


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Each test starts with an empty cache and without NEXTSTEP_CPU_KERNEL."""
    monkeypatch.setattr(kernels, "CHOICES", {})
    monkeypatch.setattr(kernels, "FORCED", {})
    monkeypatch.delenv(ENV, raising=False)


def large_linear(seed=0, out_features=768):
    """A float32 nn.Linear above head.SMALL_WEIGHT_BYTES (2 MiB; 3 MiB at 768 x 1024): timed."""
    torch.manual_seed(seed)
    return torch.nn.Linear(1024, out_features)


class FakeTimings:
    """Stands in for kernels.time_product: each candidate 'takes' the seconds given for its kernel
    function (1.0 for those not named), and every timing is counted."""

    def __init__(self, seconds: dict):
        self.seconds, self.timed = seconds, []

    def __call__(self, product, x):
        self.timed.append(product)
        return self.seconds.get(product.func, 1.0)


def key_text(linear, rows):
    return describe(shape_key(linear.weight, rows))


@pytest.mark.parametrize("winner", AVAILABLE)
def test_the_quickest_candidate_is_chosen_once_per_shape_and_cached(monkeypatch, winner):
    fake = FakeTimings({KERNEL_FUNCTIONS[name]: 1.0 if name == winner else 2.0 for name in AVAILABLE})
    monkeypatch.setattr(kernels, "time_product", fake)
    linear = large_linear()
    assert fast_product(linear, 2).func is KERNEL_FUNCTIONS[winner]
    assert len(fake.timed) == len(AVAILABLE)  # every candidate agreed with F.linear and was timed
    assert kernel_choices() == {key_text(linear, 2): winner}
    # the same shape again (another weight, even with the timings reversed): the cached name, no timing
    fake.seconds = {func: 3.0 - seconds for func, seconds in fake.seconds.items()}
    assert fast_product(large_linear(seed=1), 2).func is KERNEL_FUNCTIONS[winner]
    assert len(fake.timed) == len(AVAILABLE)
    # another row count or thread count is another shape: timed anew
    fast_product(linear, 5)
    assert len(fake.timed) == 2 * len(AVAILABLE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        fast_product(linear, 2)
    finally:
        torch.set_num_threads(threads)
    assert len(fake.timed) == 3 * len(AVAILABLE) and len(kernel_choices()) == 3
    assert kernel_choices()[key_text(linear, 2)] == winner
    assert kernel_choices()[key_text(linear, 5)] == next(name for name in AVAILABLE if name != winner)  # ties: first


def test_choice_key_reads_out_x_in_rows_dtype_and_threads():
    weight = torch.empty(4608, 1536)
    assert describe(("cpu", torch.float32, 4608, 1536, 56, 2)) == "4608x1536 rows=56 float32 threads=2"
    assert shape_key(weight, 56) == ("cpu", torch.float32, 4608, 1536, 56, torch.get_num_threads())


def test_a_candidate_that_disagrees_with_f_linear_is_not_chosen(monkeypatch):
    """Wrong candidates made to look fastest: a lost bias, outputs 1e-2 off, NaNs, and a kernel that
    fails on the shape. Here kernels.agreement_bound is ~2.5e-3 on outputs of size ~0.6
    (2 gamma_1025 (|b| + ||w|| ||x||), ||w|| ~ 0.6, ||x|| ~ 32); each wrong candidate misses by more."""
    linear = large_linear()
    weight, bias = linear.weight.detach(), linear.bias.detach()

    def failing(x):
        raise RuntimeError("no kernel for this shape")

    wrong = {
        "no_bias": partial(F.linear, weight=weight, bias=None),
        "offset": lambda x: F.linear(x, weight, bias) + 1e-2,
        "nan": lambda x: F.linear(x, weight, bias) * torch.nan,
        "failing": failing,
    }
    right = candidate_products(linear)
    seconds = {id(product): 0.1 for product in wrong.values()} | {id(right["columns"]): 0.5}
    timed = []

    def fake(product, x):
        timed.append(product)
        return seconds.get(id(product), 1.0)

    monkeypatch.setattr(kernels, "time_product", fake)
    assert choose_kernel(weight, bias, 3, {**right, **wrong}) == "columns"
    assert timed == list(right.values())  # the wrong ones were never timed


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 20])
def test_every_candidate_agrees_with_f_linear_within_the_derived_bound(rows):
    """Each candidate is a float32 evaluation of the same product: within gamma_n (|b| + sum|w||x|)
    of the float64 value (Higham 3.1), so within kernels.agreement_bound (twice that, with
    Cauchy-Schwarz for the sum) of F.linear. A wrong product misses by O(|y|) ~ 1."""
    linear = large_linear()
    x = torch.randn(rows, 1024)
    with torch.no_grad():
        expected = F.linear(x, linear.weight, linear.bias)
        exact64 = F.linear(x.double(), linear.weight.double(), linear.bias.double())
        bound = agreement_bound(x, linear.weight, linear.bias)
        magnitude = x.double().abs() @ linear.weight.double().abs().T + linear.bias.double().abs()
        assert (bound >= 2 * gamma(1025) * magnitude).all()  # the Cauchy-Schwarz form bounds the sum
        assert bound.max() < 5e-3
        for name, product in candidate_products(linear).items():
            out = product(x)
            assert out.shape == (rows, 768), name
            assert ((out.double() - exact64).abs() <= gamma(1025) * magnitude).all(), name
            assert ((out.double() - expected.double()).abs() <= bound).all(), name


def test_time_product_warms_up_then_keeps_the_least_timed_call(monkeypatch):
    """A fake clock (whole units) that only the product advances: WARMUPS untimed calls, then
    REPEATS timed ones, or fewer once the calls took BUDGET_S."""
    now = [0]
    monkeypatch.setattr(kernels, "CLOCK", lambda: now[0])
    durations = iter([9, 4, 2, 3, 1, 5, 1000])
    calls = []

    def product(x):
        calls.append(x)
        now[0] += next(durations)

    monkeypatch.setattr(kernels, "WARMUPS", 1)
    monkeypatch.setattr(kernels, "REPEATS", 5)
    monkeypatch.setattr(kernels, "BUDGET_S", 100)
    assert kernels.time_product(product, None) == 1
    assert len(calls) == 6
    # a slow kernel: once the calls took BUDGET_S, one timed call is enough
    durations = iter([60, 50, 1])
    calls.clear()
    assert kernels.time_product(product, None) == 50
    assert len(calls) == 2


@pytest.mark.parametrize("name", AVAILABLE)
def test_the_environment_variable_forces_a_kernel_without_timing(monkeypatch, name):
    monkeypatch.setattr(kernels, "time_product", lambda product, x: pytest.fail("timed under the override"))
    monkeypatch.setenv(ENV, name)
    linear = large_linear()
    product = fast_product(linear, 4)
    assert product.func is KERNEL_FUNCTIONS[name]
    assert kernel_choices() == {key_text(linear, 4): f"{name} (NEXTSTEP_CPU_KERNEL)"}
    x = torch.randn(4, 1024)
    with torch.no_grad():
        assert ((product(x) - F.linear(x, linear.weight, linear.bias)).double().abs()
                <= agreement_bound(x, linear.weight, linear.bias)).all()


def test_a_bad_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv(ENV, "mkl")
    for linear in (large_linear(), torch.nn.Linear(64, 64)):  # refused whether or not the weight is timed
        with pytest.raises(NextStepError) as error:
            fast_product(linear, 2)
        assert str(error.value) == ("NEXTSTEP_CPU_KERNEL='mkl' is not a product kernel: use one of linear, columns, "
                                    "onednn, or leave it unset to choose by timing")
    monkeypatch.setattr(head_module, "ONEDNN", False)  # a torch build without oneDNN's linear op
    monkeypatch.setenv(ENV, "onednn")
    with pytest.raises(NextStepError) as error:
        fast_product(large_linear(), 2)
    assert str(error.value) == ("NEXTSTEP_CPU_KERNEL=onednn: this torch build has no working onednn kernel; "
                                "use one of linear, columns")
    monkeypatch.setenv(ENV, "")  # empty: unset
    monkeypatch.setattr(kernels, "time_product", FakeTimings({column_linear: 0.5}))
    assert fast_product(large_linear(), 2).func is column_linear


def test_without_onednn_the_choice_is_among_the_others(monkeypatch):
    monkeypatch.setattr(head_module, "ONEDNN", False)
    fake = FakeTimings({onednn_linear: 0.1, addmm_rows: 0.5})
    monkeypatch.setattr(kernels, "time_product", fake)
    assert fast_product(large_linear(), 8).func is addmm_rows
    assert {product.func for product in fake.timed} == {addmm_rows, column_linear}


def test_small_low_precision_biasless_and_non_cpu_weights_keep_f_linear_untimed(monkeypatch):
    monkeypatch.setattr(kernels, "time_product", lambda product, x: pytest.fail("timed"))
    for name in ("", "columns"):  # with and without the override
        monkeypatch.setenv(ENV, name)
        assert fast_product(torch.nn.Linear(64, 64), 2).func is addmm_rows  # small: call overhead dominates
        assert fast_product(large_linear().to(torch.bfloat16), 2).func is addmm_rows
        assert fast_product(large_linear().half(), 20).func is addmm_rows
        assert fast_product(torch.nn.Linear(1024, 768, bias=False), 2).func is F.linear
        assert fast_product(torch.nn.Linear(1024, 768, device="meta"), 2).func is addmm_rows  # not the CPU
    assert kernel_choices() == {}
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    linear = large_linear().to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fast_product(linear, 3)(x), F.linear(x, linear.weight, linear.bias))


def test_the_speed_benchmark_records_the_choices(monkeypatch):
    monkeypatch.setattr(kernels, "time_product", FakeTimings({column_linear: 0.5}))
    linear = large_linear()
    fast_product(linear, 2)
    record = speed.kernel_record()
    assert record == {"override": None, "choices": {key_text(linear, 2): "columns"}}
    assert speed.kernel_lines({"config": "real-head", "kernels": record}) == [
        f"Product kernels chosen (real-head): {key_text(linear, 2)}: columns."]
    monkeypatch.setenv(ENV, "linear")
    fast_product(linear, 3)
    record = speed.kernel_record()
    assert record["override"] == "linear" and record["choices"][key_text(linear, 3)] == "linear (NEXTSTEP_CPU_KERNEL)"


def test_the_kernel_table_names_the_chosen_kernel(monkeypatch):
    """benchmarks/speed.py --kernels with its measurements faked: the `chosen` column is the kernel
    head.fast_product took for the shape, at each thread count."""
    monkeypatch.setattr(kernels, "time_product", FakeTimings({column_linear: 0.5}))
    monkeypatch.setattr(speed, "read_bandwidth", lambda: 2e10)
    monkeypatch.setattr(speed, "kernel_read_rates", lambda out_features, rows: dict.fromkeys(speed.KERNELS, 3.0))
    rows = speed.kernel_table().splitlines()
    assert rows[0].endswith("| chosen |") and rows[1].count("|") == rows[0].count("|")
    body = rows[2:]
    assert len(body) == 6 * len({torch.get_num_threads(), 1})
    assert all(row.endswith("| columns |") and "| 20.0 | " in row for row in body)
    assert len(kernel_choices()) == len(body)


def test_every_timed_call_reads_its_weight_after_the_caches_were_flushed(monkeypatch):
    """evict_caches runs before each call (warm-ups too), outside the timed span."""
    now, events = [0], []
    monkeypatch.setattr(kernels, "CLOCK", lambda: now[0])
    monkeypatch.setattr(kernels, "evict_caches", lambda: events.append("evict"))
    monkeypatch.setattr(kernels, "WARMUPS", 1)
    monkeypatch.setattr(kernels, "REPEATS", 3)
    monkeypatch.setattr(kernels, "BUDGET_S", 100)

    def product(x):
        events.append("call")
        now[0] += 2

    assert kernels.time_product(product, None) == 2
    assert events == ["evict", "call"] * 4


def test_the_largest_cache_is_read_from_linux_cache_listing(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert kernels.largest_cache_bytes(str(tmp_path)) == 32 * 2**20
    assert kernels.largest_cache_bytes(str(tmp_path / "missing")) is None
