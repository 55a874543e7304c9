"""The planner at NextStep-1's real shapes (a 14B-shaped folder whose weights are headers only):
generation never loads lm_head, so the plan drops it."""

import math
import sys
from pathlib import Path

import pytest

from nextstep_core.engine.checkpoint import inspect_model_folder
from nextstep_core.memory.plan import Request, estimate, is_fp8_matrix

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory import write_shapes_only  # noqa: E402


@pytest.fixture(scope="module")
def files_14b(tmp_path_factory):
    return inspect_model_folder(write_shapes_only(tmp_path_factory.mktemp("shapes14b")))


def test_the_14b_fp8_plan_for_512_on_16_gb_drops_lm_head(files_14b):
    """Today's resident weights, counted from the shapes alone (every tensor the checkpoint holds,
    the decoder matrices 1 byte + a float32 scale per row, the rest bf16), against the plan now."""
    shapes = files_14b.tensor_shapes
    today = sum(math.prod(s) + 4 * s[0] if is_fp8_matrix(n) else 2 * math.prod(s) for n, s in shapes.items())
    lm_head = 2 * math.prod(shapes["lm_head.weight"])
    assert lm_head == 2 * 152064 * 5120  # about 1.45 GiB
    request = Request(width=512, height=512)
    plan = estimate(files_14b, "fp8_e4m3fn", 0, request)
    assert plan.weights == today - lm_head
    before = estimate(files_14b, "fp8_e4m3fn", 0, request, lm_head=True)  # a load for training keeps it
    assert before.weights == today and before.total - plan.total == lm_head
