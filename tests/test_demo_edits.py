"""Edits scored in parts (did the edit / kept the rest), three-pass chains, hidden objects."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from nextstep_core.demo.checker import ObjectSpec
from nextstep_core.demo.edit_eval import (
    chain_passes,
    chain_scores,
    edit_kind_of,
    edit_parts,
    held_out_chains,
    hides_object,
    summarise_parts,
)
from nextstep_core.demo.evaluate import edit_kind, held_out_edits
from nextstep_core.demo.scenes import EDIT_KINDS, Scene, SceneObject, caption, random_edit, random_scene, render

RED_CIRCLE = SceneObject("circle", "red", "large", 10.5, 10.5)  # top left
BLUE_SQUARE = SceneObject("square", "blue", "small", 32.0, 32.0)  # center
SCENE = Scene(64, 64, "white", None, (RED_CIRCLE, BLUE_SQUARE))


def with_objects(*objects, background="white"):
    return Scene(64, 64, background, None, objects)


def test_the_target_does_every_edit_and_the_source_none_but_keeps_the_rest():
    edits = held_out_edits(120)
    kinds = [edit_kind_of(s, t) for s, _, t in edits]
    assert kinds == [edit_kind(instruction) for _, instruction, _ in edits]
    right = summarise_parts([edit_parts(render(t), s, t) for s, _, t in edits], kinds)
    copied = summarise_parts([edit_parts(render(s), s, t) for s, _, t in edits], kinds)
    assert set(right["per_kind"]) == set(EDIT_KINDS)
    for kind in EDIT_KINDS:
        assert right["per_kind"][kind]["did_edit"] == right["per_kind"][kind]["kept_rest"] == 1.0
        # the copy baseline no longer hides a failure: it keeps everything and does nothing
        assert copied["per_kind"][kind]["did_edit"] == 0.0 and copied["per_kind"][kind]["kept_rest"] == 1.0
    assert copied["all"]["right"] == 0.0 and copied["all"]["edits"] == 120


def test_a_recolour_that_also_recolours_another_object_did_the_edit_but_did_not_keep_the_rest():
    target = with_objects(SceneObject("circle", "green", "large", 10.5, 10.5), BLUE_SQUARE)
    spilled = with_objects(SceneObject("circle", "green", "large", 10.5, 10.5),
                           SceneObject("square", "cyan", "small", 32.0, 32.0))
    assert edit_parts(render(spilled), SCENE, target) == {
        "did_edit": True, "kept_objects": False, "kept_background": True, "kept_rest": False}
    # recoloured but drop-shaped (a triangle here): the edited object changed otherwise
    misshapen = with_objects(SceneObject("triangle", "green", "large", 10.5, 10.5), BLUE_SQUARE)
    assert edit_parts(render(misshapen), SCENE, target)["did_edit"] is False


def test_an_add_that_adds_two_objects_and_a_remove_that_removes_nothing():
    yellow = SceneObject("triangle", "yellow", "small", 53.0, 53.0)
    added = with_objects(RED_CIRCLE, BLUE_SQUARE, yellow)
    twice = with_objects(RED_CIRCLE, BLUE_SQUARE, yellow, SceneObject("square", "yellow", "small", 53.0, 10.5))
    assert edit_parts(render(twice), SCENE, added) == {
        "did_edit": True, "kept_objects": False, "kept_background": True, "kept_rest": False}
    removed = with_objects(BLUE_SQUARE)
    assert edit_parts(render(SCENE), SCENE, removed) == {
        "did_edit": False, "kept_objects": True, "kept_background": True, "kept_rest": True}
    # the red circle moved instead of removed: still there, so not removed
    moved = with_objects(SceneObject("circle", "red", "large", 53.0, 53.0), BLUE_SQUARE)
    assert edit_parts(render(moved), SCENE, removed)["did_edit"] is False


def test_a_changed_background_is_not_kept():
    target = with_objects(RED_CIRCLE, SceneObject("square", "blue", "small", 53.0, 53.0))
    recoloured_background = with_objects(*target.objects, background="black")
    assert edit_parts(render(recoloured_background), SCENE, target) == {
        "did_edit": True, "kept_objects": True, "kept_background": False, "kept_rest": False}


def test_held_out_chains_edit_the_scene_each_pass_should_have_made():
    chains = held_out_chains(6)
    assert chains == held_out_chains(6) and len(chains) == 6
    for scene, steps in chains:
        assert len(steps) == 3 and (scene.width, scene.height) == (64, 64)
        before = scene
        for instruction, after in steps:
            kind = edit_kind_of(before, after)
            assert edit_kind(instruction) == kind and after != before
            before = after
    # apart from the held-out edit list's stream
    assert [s[0][0] for _, s in chains] != [instruction for _, instruction, _ in held_out_edits(6)]


def test_chain_passes_are_right_on_the_scenes_and_fail_from_the_pass_that_goes_wrong():
    scene, steps = held_out_chains(1)[0]
    images = [render(scene)] + [render(after) for _, after in steps]
    assert [p["right"] for p in chain_passes(images, scene, steps)] == [True, True, True, True]
    stuck = images[:2] + [images[1], images[1]]  # passes 2 and 3 change nothing
    assert [p["right"] for p in chain_passes(stuck, scene, steps)] == [True, True, False, False]
    assert [p.get("kept_rest") for p in chain_passes(stuck, scene, steps)][1:] == [True, True, True]


class RenderingPipe:
    """Stands in for a NextStepPipeline that draws and edits perfectly: it renders the scene a
    caption or instruction of the held-out chains asks for."""

    def __init__(self, chains, spoil_pass=None):
        self.scenes = {caption(scene): scene for scene, _ in chains}
        self.edits = {instruction: after for _, steps in chains for instruction, after in steps}
        self.spoil_pass, self.seeds = spoil_pass, []

    def generate(self, prompt, image=None, seed=0, width=64, height=64, **_):
        self.seeds.append(seed)
        if image is None:
            scene = self.scenes[prompt]
        else:
            scene = self.edits[prompt.removeprefix("<image> ")]
            if seed // 1000 == self.spoil_pass:
                scene = Scene(64, 64, "black" if scene.background != "black" else "white", None, scene.objects)
        picture = render(scene)
        return type("Result", (), {"to_pil": lambda self: [picture]})()


def test_chain_scores_of_a_perfect_and_of_a_spoilt_pipe():
    chains = held_out_chains(5)
    perfect = RenderingPipe(chains)
    result = chain_scores(perfect, 5, seed=0)
    assert result["chains"] == 5 and result["chains_right"] == 1.0
    assert result["chain_per_pass"] == [{"right": 1.0}] + [{"right": 1.0, "did_edit": 1.0, "kept_rest": 1.0}] * 3
    assert sorted(perfect.seeds) == sorted(1000 * p + k for p in range(4) for k in range(5))
    spoilt = chain_scores(RenderingPipe(chains, spoil_pass=2), 5, seed=0)
    assert spoilt["chains_right"] == 0.0
    assert spoilt["chain_per_pass"][2]["kept_rest"] == 0.0 and spoilt["chain_per_pass"][1]["kept_rest"] == 1.0


def test_hides_object_when_the_background_has_an_asked_objects_colour():
    white_circle = ObjectSpec("circle", "white", None)
    plain = render(Scene(64, 64, "white", None, (BLUE_SQUARE,)))
    assert hides_object(plain, [white_circle, ObjectSpec("square", "blue", None)]) is True
    assert hides_object(plain, [ObjectSpec("square", "blue", None)]) is False
    two_tone = render(Scene(64, 64, "green", "white", (BLUE_SQUARE,), "left-right"))
    assert hides_object(two_tone, [white_circle]) is True
    assert hides_object(Image.new("RGB", (64, 64), (128, 128, 128)), [white_circle]) is False


def test_edit_kind_weights_shift_the_kinds_and_leave_the_default_draws_alone():
    scenes = [random_scene(np.random.default_rng(i)) for i in range(300)]
    uniform = [edit_kind_of(*random_edit(np.random.default_rng(i), s)[::2]) for i, s in enumerate(scenes)]
    weighted = [edit_kind_of(*random_edit(np.random.default_rng(i), s, weights={"remove": 20})[::2])
                for i, s in enumerate(scenes)]
    fits_remove = sum(len(s.objects) >= 2 for s in scenes)
    assert uniform.count("remove") < 0.6 * fits_remove
    assert weighted.count("remove") > 0.9 * fits_remove
    assert [random_edit(np.random.default_rng(i), s) for i, s in enumerate(scenes[:20])] == \
        [random_edit(np.random.default_rng(i), s, weights=None) for i, s in enumerate(scenes[:20])]


@pytest.mark.parametrize("text,message", [("shrink=2", "'shrink' is not one of recolour, move, add, remove"),
                                          ("remove=x", "'remove=x' is not KIND=WEIGHT"),
                                          ("move=0", "the weight of move must be above 0")])
def test_edit_kinds_option_errors(text, message):
    from nextstep_core.demo.edit_eval import parse_edit_kinds

    assert parse_edit_kinds("remove=3, recolour=2") == {"remove": 3.0, "recolour": 2.0}
    with pytest.raises(SystemExit, match=message):
        parse_edit_kinds(text)


def blurred(scene):
    """A soft drawing of the scene, like the model's: edges blurred, colours a little off."""
    image = render(scene).filter(ImageFilter.GaussianBlur(0.7))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + 6, 0, 255).astype(np.uint8))


def test_edits_on_a_drawing_change_only_the_edited_object():
    from nextstep_core.demo.own_edits import apply_edit, object_box

    for source, _, target in held_out_edits(40):
        assert np.array_equal(apply_edit(render(source), source, target)[..., :1].shape, (64, 64, 1))
        drawing = blurred(source)
        edited = apply_edit(drawing, source, target)
        assert all(edit_parts(edited, source, target).values()), (caption(source), caption(target))
        kind = edit_kind_of(source, target)
        changed = np.abs(edited.astype(int) - np.asarray(drawing, dtype=int)).max(-1) > 0
        if kind in ("recolour", "remove"):  # nothing changes outside the edited object's box (+1 erased)
            old = [o for o in source.objects if o not in target.objects][0]
            x0, y0, x1, y1 = object_box(np.asarray(drawing, dtype=np.float64), old)
            if kind == "remove":  # no ghost of it left: its box is background, as in the drawing
                box = np.abs(edited[y0:y1, x0:x1].astype(int) - np.asarray(render(target))[y0:y1, x0:x1])
                assert box.max() <= 6 + 0.05 * 255 * np.sqrt(3), caption(source)
            changed[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = False
            assert not changed.any()
    recoloured = with_objects(SceneObject("circle", "green", "large", 10.5, 10.5), BLUE_SQUARE)
    assert np.array_equal(apply_edit(render(SCENE), SCENE, recoloured), np.asarray(render(recoloured)))


def test_evaluate_reports_the_edit_parts_and_chains_of_the_demo_model():
    from nextstep_core.cli import DEMO_MODEL
    from nextstep_core.demo.evaluate import evaluate
    from nextstep_core.pipeline import NextStepPipeline

    pipe = NextStepPipeline.from_folder(DEMO_MODEL)
    report = evaluate(pipe, captions=2, edits=4, steps=4)
    parts = report["edit_parts"]
    assert parts["all"]["edits"] == 4 and sum(v["edits"] for v in parts["per_kind"].values()) == 4
    assert set(parts["all"]) == {"did_edit", "kept_rest", "kept_objects", "kept_background", "right", "edits"}
    assert parts["all"]["right"] <= min(parts["all"]["did_edit"], parts["all"]["kept_rest"])
    chains = chain_scores(pipe, 1, steps=4)
    assert chains["chains"] == 1 and len(chains["chain_per_pass"]) == 4
    assert chains["chains_right"] == float(all(p["right"] == 1.0 for p in chains["chain_per_pass"]))
