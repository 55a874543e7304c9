"""Free phrasings of demo captions (nextstep_core/demo/phrasing.py): what each form says and
leaves free, that the checker scores what a phrasing still asks for, and the training options
that use them (free captions in batches, scene sizes, token-sized batches)."""

import re

import numpy as np
import pytest
import torch

from nextstep_core.demo.checker import ObjectSpec, score_specs
from nextstep_core.demo.data import example_batches, make_batch, parse_scene_sizes, parse_size_weights
from nextstep_core.demo.evaluate import FREE_SIZES, free_phrased_captions, free_phrased_edits
from nextstep_core.demo.phrasing import (
    FORMS,
    Phrasing,
    caption_request,
    form_phrasing,
    free_caption,
    in_reading_order,
    parse_phrasing_weights,
    phrase,
    phrase_instruction,
    random_phrasing,
    scene_request,
)
from nextstep_core.demo.scenes import Scene, SceneObject, caption, random_edit, random_scene, render
from nextstep_core.demo.tiny_tokenizer import write_tiny_tokenizer
from nextstep_core.engine.prompt import SpecialIds, load_tokenizer

TWO_REDS = Scene(64, 64, "white", None, (SceneObject("circle", "red", "large", 10.5, 10.5),
                                         SceneObject("square", "red", "small", 32.0, 10.0),
                                         SceneObject("triangle", "blue", "small", 32.0, 53.0)))


def test_each_form_says_what_it_should():
    rng = np.random.default_rng(0)
    request = scene_request(TWO_REDS)

    def said(form):
        return phrase(request, form_phrasing(form), rng)

    exact, asked = said("exact")
    assert exact == caption(TWO_REDS) and asked == request
    text, asked = said("no_size")
    assert "large" not in text and "small" not in text and all(o.size is None for o in asked.objects)
    text, asked = said("no_background")
    assert "background" not in text and asked.background is None
    text, _ = said("background_first")
    assert text.startswith("on a white background, a large red circle")
    text, asked = said("no_position")
    assert text == "a large red circle, a small red square and a small blue triangle, on a white background"
    assert all(o.position is None for o in asked.objects)
    text, asked = said("telegraphic")
    assert text == "large red circle, top left; small red square, top; small blue triangle, bottom; white background"
    assert asked == request
    text, asked = said("plural")
    assert text == ("a small blue triangle at the bottom, and a large circle at the top left and a small square at "
                    "the top, both red, on a white background")
    assert asked == request
    assert said("no_article")[0].startswith("large red circle at the top left, small red square")
    text, asked = said("casing")
    assert text == caption(TWO_REDS)[0].upper() + caption(TWO_REDS)[1:] + "." and asked == request


def test_synonyms_keep_the_request():
    rng = np.random.default_rng(1)
    texts = {phrase(scene_request(TWO_REDS), form_phrasing("size_synonyms"), rng)[0] for _ in range(30)}
    assert any("big red circle" in t for t in texts) and any("tiny" in t or "little" in t for t in texts)
    scene = Scene(64, 64, "black", None, (SceneObject("circle", "green", "small", 32.0, 32.0),))
    places = {phrase(scene_request(scene), form_phrasing("position_synonyms"), rng)[0] for _ in range(30)}
    assert places == {f"a small green circle {p}, on a black background"
                      for p in ("in the middle", "in the centre", "at the center")}


def test_the_true_scene_honours_every_free_phrasing():
    """The rendered scene scores 1 against what each phrasing asks for (the checker reads crisp
    renders exactly), and a wrong background or colour does not."""
    rng = np.random.default_rng(2)
    for _ in range(40):
        scene = random_scene(rng)
        image = render(scene)
        for form in FORMS:
            how = random_phrasing(rng) if form == "mixed" else form_phrasing(form)
            _, asked = phrase(scene_request(scene), how, rng)
            assert score_specs(image, list(asked.objects), asked.background) == 1.0, (form, caption(scene))
    _, asked = phrase(scene_request(TWO_REDS), form_phrasing("no_position"), rng)
    wrong = [ObjectSpec(o.shape, "green", o.position, o.size) for o in asked.objects]
    assert score_specs(render(TWO_REDS), wrong, None) == 0.0


def test_left_out_attributes_are_free_for_the_checker():
    """A circle named without position or size matches one anywhere, of either size."""
    moved = Scene(64, 64, "white", None, (SceneObject("circle", "red", "small", 53.0, 53.0),))
    free = [ObjectSpec("circle", "red", None, None)]
    assert score_specs(render(moved), free, None) == 1.0
    assert score_specs(render(moved), [ObjectSpec("circle", "red", "top left", None)], None) == 0.0
    assert score_specs(render(moved), [ObjectSpec("circle", "red", None, "large")], None) == 0.0


def test_random_phrasings_cover_every_choice_and_are_seeded():
    rng = np.random.default_rng(3)
    drawn = [random_phrasing(rng) for _ in range(400)]
    for name, values in (("sizes", {"word", "synonym", "none"}), ("positions", {"word", "synonym", "none"}),
                         ("background", {"last", "first", "none"}), ("telegraphic", {True, False}),
                         ("plural", {True, False}), ("article", {True, False}), ("casing", {True, False})):
        assert {getattr(p, name) for p in drawn} == values, name
    assert sum(p == Phrasing() for p in drawn) > 0  # the exact grammar stays one of the forms
    text = caption(TWO_REDS)
    assert ([free_caption(text, np.random.default_rng(7)) for _ in range(3)]
            == [free_caption(text, np.random.default_rng(7)) for _ in range(3)])
    assert caption_request(text) == scene_request(TWO_REDS)


def test_phrasing_weights_change_training_draws_only():
    assert parse_phrasing_weights("positions=5:3:3, background=0:0:1") == {"positions": (5.0, 3.0, 3.0),
                                                                           "background": (0.0, 0.0, 1.0)}
    for bad, message in (("colours=1:1:1", "'colours' is not one of sizes, positions, background"),
                         ("sizes=1:1", "sizes needs 3 weights for word:synonym:none"),
                         ("background=0:0:0", "at least one above 0"), ("positions=a:b:c", "needs 3 weights")):
        with pytest.raises(SystemExit, match=message):
            parse_phrasing_weights(bad)
    rng = np.random.default_rng(3)
    drawn = [random_phrasing(rng, {"positions": (0, 0, 1), "background": (0, 1, 0)}) for _ in range(50)]
    assert {(p.positions, p.background) for p in drawn} == {("none", "first")}
    assert {p.sizes for p in drawn} == {"word", "synonym", "none"}  # the defaults for the rest
    text = caption(TWO_REDS)
    for _ in range(20):
        free = free_caption(text, rng, {"positions": (0, 0, 1), "background": (0, 0, 1)})
        assert not any(word in free for word in ("left", "right", "top", "bottom", "middle", "center", "background"))


def test_captions_without_positions_name_objects_in_reading_order():
    # TWO_REDS lists a red circle (top left), a red square (top) and a blue triangle (bottom)
    scrambled = Scene(64, 64, "white", None, TWO_REDS.objects[::-1])
    request = scene_request(scrambled)
    assert [o.shape for o in request.objects] == ["triangle", "square", "circle"]
    ordered, how = in_reading_order(request, Phrasing(positions="none", plural=True))
    assert [o.shape for o in ordered.objects] == ["circle", "square", "triangle"]
    assert how.plural is False  # "a blue triangle, and a circle and a square, both red" would break the order
    # a shared colour at the end keeps the plural: "a blue triangle, and a circle and a square, both red"
    late_pair = Scene(64, 64, "white", None, (SceneObject("triangle", "blue", "small", 10.5, 10.5),
                                              SceneObject("circle", "red", "large", 53.0, 32.0),
                                              SceneObject("square", "red", "small", 32.0, 53.0)))
    assert in_reading_order(scene_request(late_pair), Phrasing(positions="none", plural=True))[1].plural
    rng = np.random.default_rng(2)
    unplaced = {"positions": (0, 0, 1), "sizes": (0, 0, 1), "background": (0, 0, 1)}

    def shapes(text):
        return re.findall(r"circle|square|triangle", text)

    for _ in range(20):
        text = free_caption(caption(scrambled), rng, unplaced)
        assert shapes(text) == ["circle", "square", "triangle"], text
    # the scene's order without the convention (runs before it), and named positions keep it
    assert {tuple(shapes(free_caption(caption(scrambled), rng, unplaced, reading_order=False)))
            for _ in range(20)} == {("triangle", "square", "circle")}
    placed = free_caption(caption(scrambled), rng, {"positions": (1, 0, 0), "background": (0, 0, 1)})
    assert placed.lower().index("triangle") < placed.lower().index("circle")


def test_edit_instructions_vary_where_they_can():
    rng = np.random.default_rng(4)
    assert phrase_instruction("move the red circle to the top left", form_phrasing("position_synonyms"), rng)[0] in {
        "move the red circle to the upper left", "move the red circle to the top left corner"}
    assert phrase_instruction("add a small yellow triangle at the bottom", form_phrasing("no_size"), rng) == (
        "add a yellow triangle at the bottom", None)
    assert phrase_instruction("add a large red circle on the left", form_phrasing("no_article"), rng) == (
        "add large red circle on the left", "large")
    assert phrase_instruction("remove the red circle", form_phrasing("casing"), rng) == ("Remove the red circle.", None)
    # an added object's position is always named (the edit's target says where it goes)
    assert phrase_instruction("add a small red circle on the left", form_phrasing("no_position"), rng)[0] == (
        "add a small red circle on the left")


def test_held_out_free_sets_are_fixed_and_use_every_form():
    for size in FREE_SIZES:
        prompts = free_phrased_captions(24, size)
        assert prompts == free_phrased_captions(24, size)
        assert [p[0] for p in prompts] == [*FORMS, *FORMS]
        plural = [p for p in prompts if p[0] == "plural"]
        assert all("both" in p[1] for p in plural)
    assert free_phrased_captions(12, (64, 64)) != free_phrased_captions(12, (96, 96))
    edits = free_phrased_edits(24)
    assert [e[0] for e in edits] == [*FORMS, *FORMS]
    for _, source, text, objects, background in edits:
        assert source.size == (64, 64) and text and objects and background is not None


def test_free_captions_reach_the_batches(tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    special = SpecialIds.from_tokenizer(tokenizer)
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(32)]
    examples = [("t2i", caption(s), torch.zeros(16, 64), None, (4, 4)) for s in scenes]

    def texts(free):
        batch = make_batch(tokenizer, special, examples, np.random.default_rng(1), free_captions=free)
        return [tokenizer.decode(row[mask.bool()]) for row, mask in zip(batch.input_ids, batch.attention_mask)]

    exact, free = texts(0.0), texts(1.0)
    assert sum(caption(s) in t for s, t in zip(scenes, exact)) >= 26  # 10 % dropped for guidance
    assert sum(caption(s) in t for s, t in zip(scenes, free)) < 16
    edit_rng = np.random.default_rng(5)
    triples = [random_edit(edit_rng, random_scene(edit_rng)) for _ in range(32)]
    edits = [("edit", f"<image> {ins}", torch.zeros(16, 64), torch.zeros(16, 64), (4, 4)) for _, ins, _ in triples]
    batch = make_batch(tokenizer, special, edits, np.random.default_rng(1), free_captions=1.0)
    assert batch.source_tokens.shape[0] == (batch.input_ids == special.placeholder).any(dim=1).sum()


def test_scene_sizes_and_token_sized_batches():
    assert parse_scene_sizes("64x64, 96x96,128X64") == ((64, 64), (96, 96), (128, 64))
    for bad, message in (("64x", "is not WIDTHxHEIGHT"), ("72x64", "multiples of 16"), ("48x64", "at least 64")):
        with pytest.raises(SystemExit, match=message):
            parse_scene_sizes(bad)
    examples = ([("t2i", "a", None, None, (4, 4))] * 80 + [("t2i", "b", None, None, (8, 8))] * 80
                + [("t2i", "c", None, None, (6, 6))] * 80)
    batches = example_batches(examples, 64, np.random.default_rng(0), batch_tokens=1024)
    sizes = {}
    for _ in range(30):
        batch = next(batches)
        sizes[batch[0][4]] = len(batch)
    assert sizes == {(4, 4): 64, (8, 8): 16, (6, 6): 28}


def test_size_weights_draw_those_sizes_more_often():
    assert parse_size_weights("128x128=3, 96x96=0.5") == {(128, 128): 3.0, (96, 96): 0.5}
    for bad, message in (("128x128", "is not WIDTHxHEIGHT=FACTOR"), ("128x128=0", "must be above 0"),
                         ("72x64=2", "multiples of 16")):
        with pytest.raises(SystemExit, match=message):
            parse_size_weights(bad)
    # 100 examples of 64x64 (grid 4x4) and 50 of 128x64 (grid 4 rows x 8 columns)
    examples = [("t2i", "a", None, None, (4, 4))] * 100 + [("t2i", "b", None, None, (4, 8))] * 50

    def share_of_wide(size_weights, draws=4000):
        batches = example_batches(examples, 4, np.random.default_rng(0), size_weights=size_weights)
        return np.mean([next(batches)[0][4] == (4, 8) for _ in range(draws)])

    # binomial standard error of a share near 1/3 or 3/5 over 4000 draws: <= 0.008; 0.03 is ~4 of them
    assert abs(share_of_wide(None) - 1 / 3) < 0.03
    assert abs(share_of_wide({(128, 64): 3.0}) - 150 / 250) < 0.03
    with pytest.raises(SystemExit, match="no training scenes of size 96x96"):
        example_batches(examples, 4, np.random.default_rng(0), size_weights={(96, 96): 2.0})


def test_size_weights_must_name_a_scene_size_before_any_work(tmp_path):
    from nextstep_core.demo.train import main

    with pytest.raises(SystemExit, match="no training scenes of size 96x96"):
        main(["model", "--out", str(tmp_path / "run"), "--scene-sizes", "64x64", "--size-weights", "96x96=2"])
