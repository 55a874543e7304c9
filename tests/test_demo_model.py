"""The embedded demo model: loads through the public loader, generates and edits at its sizes."""

import json

import pytest
from PIL import Image

from nextstep_core.checkpoint import inspect_model_folder
from nextstep_core.cli import DEMO_MODEL
from nextstep_core.pipeline import NextStepPipeline


@pytest.fixture(scope="module")
def demo():
    return NextStepPipeline.from_folder(DEMO_MODEL)


def test_demo_model_is_a_1_1_release_layout_and_small():
    files = inspect_model_folder(DEMO_MODEL)
    assert files.version.name == "1.1" and files.vae_folder == DEMO_MODEL / "vae"
    total = sum(p.stat().st_size for p in DEMO_MODEL.rglob("*") if p.is_file())
    assert total < 30 * 2**20
    assert json.loads((DEMO_MODEL / "config.json").read_text())["model_type"] == "stepx_llama"


@pytest.mark.parametrize("size", [(64, 64), (128, 64), (64, 128)])
def test_demo_model_generates_the_requested_sizes(demo, size):
    result = demo.generate("a large red circle in the center, on a blue background", width=size[0], height=size[1],
                           steps=4, seed=1)
    assert result.to_pil()[0].size == size


def test_demo_model_edits(demo):
    source = Image.new("RGB", (64, 64), (30, 50, 220))
    result = demo.generate("<image> add a large red circle in the center", image=source, steps=4, seed=1)
    assert result.images.shape == (1, 64, 64, 3)
