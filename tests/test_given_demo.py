"""Acceptance of given tokens on the demo model, scored by the demo checker on held-out scenes
(tests/given_scenes.py: seeds 3000-3002, never used in training), 64x64 (16 tokens), the
model's default sampling. Measured over 24 and 48 cases each (benchmarks/given_tokens.py,
benchmarks/README.md): continuation 0.98 / 0.97, region redraw 1.00 / 0.99, masked edit 0.88 /
0.86 against 0.84 / 0.82 for the same edits unmasked."""

import numpy as np
import pytest
import torch
from given_scenes import continuation_cases, edit_cases, region_cases

from nextstep_core import DEMO_MODEL, NextStepPipeline
from nextstep_core.demo.checker import score, score_edit
from nextstep_core.demo.scenes import caption, render
from nextstep_core.sampling.token_loop import cpu_threads

COUNT = 24


@pytest.fixture(scope="module")
def demo():
    """The demo model, run on one CPU thread: its 64x64 encodes and decodes are small enough that
    waking a second thread costs more than it saves (on a loaded 2-core machine, 4x the time)."""
    with cpu_threads(1):
        yield NextStepPipeline.from_folder(DEMO_MODEL)


def assert_given_kept(demo, result, image):
    """Every given token of the result is the reference's (its normalised posterior mean), bit for bit."""
    expected = demo.reference_tokens(demo.image_input(image, "the reference"))
    assert result.given.any()
    assert torch.equal(result.tokens[0, result.given], expected[result.given])


def test_continuation_keeps_the_top_half_and_completes_the_scene(demo):
    """The top two token rows (32 px) are kept; the prompt describes the whole scene."""
    scores = []
    for i, scene in enumerate(continuation_cases(COUNT)):
        image = render(scene)
        result = demo.generate(caption(scene), reference=image, keep_rows=2, seed=i)
        assert result.given.tolist() == [True] * 8 + [False] * 8
        assert_given_kept(demo, result, image)
        scores.append(score(result.to_pil()[0], caption(scene)))
    assert np.mean(scores) >= 0.8, scores


def test_region_redraw_puts_a_different_object_in_the_masked_cell(demo):
    """One object's grid cell is masked; the prompt names another shape and colour there (and
    the rest of the scene as it is)."""
    scores = []
    for i, (source, target, mask) in enumerate(region_cases(COUNT)):
        image = render(source)
        result = demo.generate(caption(target), reference=image, region=mask, seed=i)
        assert_given_kept(demo, result, image)
        scores.append(score(result.to_pil()[0], caption(target)))
    assert np.mean(scores) >= 0.8, scores


def test_masked_edit_keeps_the_outside_and_edits_at_least_as_well_as_unmasked(demo):
    """The mask covers the grid cells of the objects the edit touches; outside it the edit
    image's tokens are kept. The edit score (the checker against the target's caption) is
    compared with the same edits, seeds and settings unmasked."""
    masked, unmasked = [], []
    for i, (source, instruction, target, mask) in enumerate(edit_cases(COUNT)):
        image, prompt = render(source), f"<image> {instruction}"
        result = demo.generate(prompt, image=image, region=mask, seed=i)
        assert_given_kept(demo, result, image)
        masked.append(score_edit(result.to_pil()[0], caption(target)))
        unmasked.append(score_edit(demo.generate(prompt, image=image, seed=i).to_pil()[0], caption(target)))
    assert np.mean(masked) >= np.mean(unmasked), (masked, unmasked)
