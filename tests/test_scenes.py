"""Scene generator, captions, edit triples and the analytic prompt-following checker."""

import re
from dataclasses import replace

import numpy as np
import pytest

from nextstep_core.demo.checker import (
    BackgroundSpec,
    ObjectSpec,
    find_background,
    find_objects,
    parse_background,
    parse_caption,
    score,
    score_edit,
)
from nextstep_core.demo.scenes import (
    COLORS,
    EDIT_KINDS,
    PALETTE,
    SHAPES,
    Scene,
    SceneObject,
    caption,
    edit_dataset,
    position_of,
    random_edit,
    random_scene,
    render,
    scene_dataset,
)
from nextstep_core.errors import NextStepError

SIZES = [(64, 64), (128, 64), (64, 128), (128, 128)]


def scenes(seed, count, width=64, height=64):
    rng = np.random.default_rng(seed)
    return [random_scene(rng, width, height) for _ in range(count)]


def degrade(image, rng, sigma=8.0):
    """Gaussian noise (sigma in 0..255 units) then a 3x3 box blur, like a VAE round trip."""
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = pixels.shape[:2]
    blurred = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9
    return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- generator


def test_same_seed_same_bytes_and_captions_different_seed_differs():
    first, again, other = (scene_dataset(seed, 12, SIZES) for seed in (7, 7, 8))
    assert [(i.tobytes(), c) for i, c in first] == [(i.tobytes(), c) for i, c in again]
    assert [i.tobytes() for i, _ in first] != [i.tobytes() for i, _ in other]
    assert [c for _, c in first] != [c for _, c in other]


def test_edit_dataset_is_deterministic():
    first, again = edit_dataset(3, 8, SIZES), edit_dataset(3, 8, SIZES)
    flatten = lambda data: [(s.tobytes(), text, t.tobytes()) for s, text, t in data]  # noqa: E731
    assert flatten(first) == flatten(again)


@pytest.mark.parametrize("width,height", SIZES)
def test_every_listed_size_renders_with_the_scene_rules(width, height):
    for scene in scenes(1, 40, width, height):
        image = render(scene)
        assert image.size == (width, height) and image.mode == "RGB"
        assert 1 <= len(scene.objects) <= 3
        kinds = [(o.shape, o.color) for o in scene.objects]
        assert len(set(kinds)) == len(kinds)
        cells = [position_of(o.x, o.y, width, height) for o in scene.objects]
        assert len(set(cells)) == len(cells)
        assert not {o.color for o in scene.objects} & set(scene.background_colors)
        pixels = np.asarray(image)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert {tuple(p) for p in border} <= {PALETTE[c] for c in scene.background_colors}


def test_sizes_below_the_minimum_are_refused():
    with pytest.raises(NextStepError, match="minimum"):
        random_scene(np.random.default_rng(0), 32, 64)


def test_caption_grammar_and_round_trip():
    scene = Scene(
        128,
        128,
        "white",
        "black",
        (SceneObject("circle", "red", "large", 21.5, 64.5), SceneObject("square", "blue", "small", 64.5, 107.5)),
        "left-right",
    )
    text = caption(scene)
    assert text == (
        "a large red circle on the left and a small blue square at the bottom, "
        "on a background that is white on the left and black on the right"
    )
    assert parse_caption(text) == [
        ObjectSpec("circle", "red", "left", "large"),
        ObjectSpec("square", "blue", "bottom", "small"),
    ]
    assert parse_background(text) == BackgroundSpec("white", "black", "left-right")
    assert caption(scene, sizes=False, background=False) == "a red circle on the left and a blue square at the bottom"
    assert parse_background("a red circle on the left") is None
    assert parse_caption("A red circle in the centre.") == [ObjectSpec("circle", "red", "center", None)]


def test_parse_round_trips_random_scenes():
    for scene in scenes(2, 100):
        specs = parse_caption(caption(scene))
        assert [(s.shape, s.color, s.position, s.size) for s in specs] == [
            (o.shape, o.color, position_of(o.x, o.y, 64, 64), o.size) for o in scene.objects
        ]
        background = parse_background(caption(scene))
        assert (background.color, background.color2) == (scene.background, scene.background2)


def test_unreadable_caption_is_an_error():
    with pytest.raises(NextStepError, match="cannot read"):
        parse_caption("a red blob somewhere")


# ---------------------------------------------------------------- edits


def object_set(scene):
    """{(shape, colour, position, size)} of a scene."""
    return {(o.shape, o.color, position_of(o.x, o.y, scene.width, scene.height), o.size) for o in scene.objects}


def check_edit(source, instruction, target):
    """Assert the target scene is the source changed exactly as the instruction says."""
    before, after = object_set(source), object_set(target)
    color, shape = "|".join(COLORS), "|".join(SHAPES)
    if m := re.fullmatch(rf"make the ({color}) ({shape}) ({color})", instruction):
        old = next(o for o in before if o[:2] == (m[2], m[1]))
        assert after == before - {old} | {(m[2], m[3], old[2], old[3])}
        return "recolour"
    if m := re.fullmatch(rf"move the ({color}) ({shape}) to the (.+)", instruction):
        old = next(o for o in before if o[:2] == (m[2], m[1]))
        assert old[2] != m[3]
        assert after == before - {old} | {(m[2], m[1], m[3], old[3])}
        return "move"
    if m := re.fullmatch(r"add (.+)", instruction):
        (spec,) = parse_caption(m[1])
        assert after == before | {(spec.shape, spec.color, spec.position, spec.size)}
        assert len(after) == len(before) + 1
        return "add"
    if m := re.fullmatch(rf"remove the ({color}) ({shape})", instruction):
        old = next(o for o in before if o[:2] == (m[2], m[1]))
        assert after == before - {old} and after
        return "remove"
    raise AssertionError(f"unexpected instruction {instruction!r}")


def test_edit_triples_of_all_four_kinds_match_their_instruction():
    rng = np.random.default_rng(4)
    seen = set()
    for index in range(160):
        width, height = SIZES[index % len(SIZES)]
        source, instruction, target = random_edit(rng, random_scene(rng, width, height))
        kind = check_edit(source, instruction, target)
        seen.add(kind)
        assert target.background_colors == source.background_colors
        assert not {o.color for o in target.objects} & set(target.background_colors)
        assert score_edit(render(target), caption(target)) == 1.0
        assert score_edit(render(source), caption(target)) < 1.0
    assert seen == set(EDIT_KINDS)


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_each_edit_kind_can_be_asked_for(kind):
    rng = np.random.default_rng(5)
    scene = random_scene(rng)
    while len(scene.objects) != 2:  # two objects leave room for every kind
        scene = random_scene(rng)
    source, instruction, target = random_edit(rng, scene, kind)
    assert check_edit(source, instruction, target) == kind


# ---------------------------------------------------------------- checker


def test_checker_finds_rendered_objects_and_background():
    scene = Scene(64, 64, "yellow", "blue", (SceneObject("triangle", "black", "large", 32.5, 10.5),), "top-bottom")
    (found,) = find_objects(render(scene))
    assert (found.shape, found.color, found.position, found.size) == ("triangle", "black", "top", "large")
    assert find_background(np.asarray(render(scene))) == BackgroundSpec("yellow", "blue", "top-bottom")


@pytest.mark.parametrize("width,height,count", [(64, 64, 200), (128, 64, 60), (64, 128, 60), (128, 128, 40)])
def test_ground_truth_scores_high(width, height, count):
    scores = [score(render(s), caption(s)) for s in scenes(10, count, width, height)]
    assert np.mean(scores) >= 0.98


def test_scrambled_captions_score_low():
    data = [(render(s), s) for s in scenes(11, 200)]
    other = [score(image, caption(data[(k + 1) % len(data)][1])) for k, (image, _) in enumerate(data)]
    assert np.mean(other) <= 0.2
    rng = np.random.default_rng(0)
    recoloured = []
    for image, scene in data:
        objects = [replace(o, color=rng.choice([c for c in COLORS if c != o.color]).item()) for o in scene.objects]
        recoloured.append(score(image, caption(replace(scene, objects=tuple(objects))), background=False))
    assert np.mean(recoloured) <= 0.2


def test_ground_truth_survives_noise_and_blur():
    rng = np.random.default_rng(12)
    for width, height in SIZES:
        scores = [score(degrade(render(s), rng), caption(s)) for s in scenes(13, 50, width, height)]
        assert np.mean(scores) >= 0.9
