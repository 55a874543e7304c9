"""Training data for edits that chain: weighted edit kinds, noisy sources, edits on the model's own
drawings, and free captions that leave out only the default background."""

import numpy as np
import pytest
import torch
from test_training import fixed_losses, small_spec, tiny_batch

from nextstep_core.demo.checker import parse_background
from nextstep_core.demo.objective import training_losses
from nextstep_core.demo.own_edits import load_triples, save_triples
from nextstep_core.demo.phrasing import default_background, free_caption
from nextstep_core.demo.scenes import Scene, SceneObject, caption, render
from nextstep_core.demo.train import new_demo_model, vae_config
from nextstep_core.engine.vae import ImageTokenizer

RED_CIRCLE = SceneObject("circle", "red", "large", 10.5, 10.5)
WHITE_SQUARE = SceneObject("square", "white", "small", 32.0, 32.0)


def phrasings(scene, default_only, count=200):
    rng = np.random.default_rng(0)
    return [free_caption(caption(scene), rng, {"background": (0, 0, 1)}, default_only=default_only)
            for _ in range(count)]


@pytest.mark.parametrize("background,objects,default", [("white", (RED_CIRCLE,), "white"),
                                                        ("black", (RED_CIRCLE, WHITE_SQUARE), "black")])
def test_free_captions_leave_out_only_the_default_background(background, objects, default):
    assert default_background([o.color for o in objects]) == default
    on_default = Scene(64, 64, background, None, objects)
    # every phrasing asked to leave the background out does so on the default background
    assert all("background" not in text for text in phrasings(on_default, True))
    for other in (Scene(64, 64, "green", None, objects), Scene(64, 64, background, "green", objects, "left-right")):
        kept = phrasings(other, True)
        assert all(parse_background(text.lower().rstrip(".")) is not None or "background" in text for text in kept)
        assert all("green" in text and "background" in text for text in kept)
        # the old rule (--free-background any) leaves any background out
        assert all("background" not in text for text in phrasings(other, False))


def test_source_noise_perturbs_only_the_edit_sources(tmp_path):
    from nextstep_core.demo.objective import edited_token_weights

    tokenizer, batch = tiny_batch(tmp_path, "edit")
    model, _ = new_demo_model(tokenizer, small_spec(), seed=0)
    assert batch.source_tokens is not None
    plain = fixed_losses(model, batch).image.item()
    zero = training_losses(model, batch, generator=torch.Generator().manual_seed(0), head_repeats=2, source_noise=0.0)
    noised = training_losses(model, batch, generator=torch.Generator().manual_seed(0), head_repeats=2,
                             source_noise=0.5)
    assert zero.image.item() == plain != noised.image.item()
    # the changed-token weights still compare the clean source (the batch itself is left alone)
    before = batch.source_tokens.clone()
    training_losses(model, batch, head_repeats=2, source_noise=0.5, changed_weight=3.0)
    assert torch.equal(batch.source_tokens, before)
    assert edited_token_weights(batch, 3.0) is not None
    # a text-to-image batch has no source: source_noise changes nothing there
    _, t2i = tiny_batch(tmp_path / "t2i")
    assert fixed_losses(model, t2i).image.item() == training_losses(
        model, t2i, generator=torch.Generator().manual_seed(0), head_repeats=2, source_noise=0.5).image.item()


def test_own_edit_triples_join_the_training_edits(tmp_path):
    from nextstep_core.demo.data import encode_tokens, own_edit_examples

    scene = Scene(64, 64, "white", None, (RED_CIRCLE,))
    target = Scene(64, 64, "white", None, (SceneObject("circle", "blue", "large", 10.5, 10.5),))
    path = tmp_path / "own.npz"
    save_triples(path, [np.asarray(render(scene))] * 2, ["make the red circle blue"] * 2,
                 [np.asarray(render(target))] * 2)
    triples = load_triples(path)
    assert [t[1] for t in triples] == ["make the red circle blue"] * 2
    assert np.array_equal(triples[0][2], np.asarray(render(target))) and triples[0][0].dtype == np.uint8
    torch.manual_seed(0)
    vae = ImageTokenizer(vae_config(small_spec())).eval()
    messages = []
    examples = own_edit_examples(vae, path, messages.append)
    assert messages == [f"encoded 2 edit triples on the model's own drawings from {path}"]
    assert [(e[0], e[1], e[4]) for e in examples] == [("edit", "<image> make the red circle blue", (4, 4))] * 2
    # the targets and sources are the file's images, encoded as the other training images are
    assert torch.equal(torch.stack([e[2] for e in examples]), encode_tokens(vae, [render(target)] * 2))
    assert torch.equal(torch.stack([e[3] for e in examples]), encode_tokens(vae, [render(scene)] * 2))


def test_train_options_for_edits_are_parsed():
    from nextstep_core.demo.train_args import build_parser

    args = build_parser("x", "out").parse_args(["model", "--out", "r", "--edit-kinds", "remove=2,move=2",
                                                "--source-noise", "0.5", "--own-edits", "own.npz"])
    assert args.edit_kinds == {"remove": 2.0, "move": 2.0} and args.source_noise == 0.5
    assert args.own_edits == "own.npz" and args.free_background == "default"
    assert build_parser("x", "out").parse_args(["model", "--out", "r", "--free-background", "any"]).free_background \
        == "any"


def test_edit_sizes_set_the_training_edits_sizes_apart_from_the_scenes(tmp_path):
    from nextstep_core.demo.data import build_examples

    torch.manual_seed(0)
    vae = ImageTokenizer(vae_config(small_spec())).eval()
    examples = build_examples(vae, 0, 4, 3, lambda _: None, sizes=((64, 64), (128, 64)), edit_sizes=((64, 64),))
    assert sorted(e[4] for e in examples if e[0] == "t2i") == [(4, 4), (4, 4), (4, 8), (4, 8)]
    assert [e[4] for e in examples if e[0] == "edit"] == [(4, 4)] * 3
