"""What a user hands the given-token options: the token masks of keep_rows, region and grow
(cell overlap, growth, non-square grids), every validation error (raised before any model
work), the CLI flags, and LatentImage as the edit image (it equals the pixel edit where the
latent is the image's own encoding, and draws the same noise)."""

import numpy as np
import pytest
import torch
from PIL import Image

import nextstep_core.sampling.token_loop as token_loop
from nextstep_core import LatentImage, NextStepError
from nextstep_core.checks import image_to_pixels, region_pixels
from nextstep_core.cli import main
from nextstep_core.sampling.given import continuation_mask, region_given_mask, region_sampled_cells

SOURCE = Image.new("RGB", (48, 32), (200, 40, 40))
SOURCE.paste((20, 30, 220), (10, 4, 30, 20))


def pixels(h, w, *points):
    mask = torch.zeros(h, w, dtype=torch.bool)
    for y, x in points:
        mask[y, x] = True
    return mask


def test_continuation_mask_keeps_whole_rows():
    assert continuation_mask(1, (2, 3)).tolist() == [True] * 3 + [False] * 3
    assert continuation_mask(0, (2, 3)).tolist() == [False] * 6
    assert continuation_mask(2, (2, 3)).all()


def test_a_token_is_sampled_when_its_cell_holds_one_masked_pixel():
    cells = region_sampled_cells(pixels(32, 48, (17, 33)), 16)  # row 1 (16..31), column 2 (32..47)
    assert cells.tolist() == [[False, False, False], [False, False, True]]
    assert region_sampled_cells(pixels(32, 48, (15, 15)), 16).nonzero().tolist() == [[0, 0]]
    assert region_sampled_cells(pixels(32, 48, (16, 16)), 16).nonzero().tolist() == [[1, 1]]
    box = torch.zeros(32, 48, dtype=torch.bool)
    box[14:18, 30:34] = True  # straddles both token rows and columns 1 and 2
    assert region_sampled_cells(box, 16).tolist() == [[False, True, True], [False, True, True]]
    assert region_given_mask(box, 16).tolist() == [True, False, False, True, False, False]


def test_grow_widens_the_cells_by_a_square_neighbourhood_clipped_at_the_border():
    corner = pixels(48, 64, (0, 0))  # a non-square 3 x 4 grid
    assert region_sampled_cells(corner, 16, grow=1).int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    middle = pixels(48, 64, (20, 20))
    assert region_sampled_cells(middle, 16, grow=1).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert region_sampled_cells(middle, 16, grow=2).all()
    assert region_sampled_cells(middle, 16, grow=0).int().tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_region_inputs_in_every_accepted_form():
    mask = torch.zeros(32, 48)
    mask[3, 40] = 0.25
    expected = mask > 0
    assert torch.equal(region_pixels(mask), expected)
    assert torch.equal(region_pixels(mask[None]), expected)  # ComfyUI's (1, H, W) MASK
    assert torch.equal(region_pixels(mask.numpy()), expected)
    assert torch.equal(region_pixels(expected), expected)
    picture = Image.fromarray((expected.numpy() * 255).astype(np.uint8), "L")
    assert torch.equal(region_pixels(picture), expected)


def test_the_result_marks_the_given_tokens(pipe_1_1):
    mask = torch.zeros(32, 48)
    mask[20, 40] = 1
    result = pipe_1_1.generate("a red circle", reference=SOURCE, region=mask, grow=1, steps=2, decode=False)
    assert result.given.dtype == torch.bool and result.given.tolist() == [True, False, False, True, False, False]
    result = pipe_1_1.generate("a red circle", reference=SOURCE, keep_rows=1, steps=2, decode=False)
    assert result.given.tolist() == [True] * 3 + [False] * 3


ONE_CELL = torch.zeros(32, 48)
ONE_CELL[0:16, 0:16] = 1
LATENT = torch.zeros(1, 16, 4, 6)
BAD_INPUT = [
    (dict(reference=SOURCE, keep_rows=1, region=ONE_CELL), "keep_rows and region cannot be used together"),
    (dict(reference=SOURCE, keep_rows=3),
     "keep_rows 3 must be a whole number from 0 to 1 (the output has 2 token rows of 16 pixels"),
    (dict(reference=SOURCE, keep_rows=-1), "keep_rows -1 must be a whole number from 0 to 1"),
    (dict(reference=SOURCE, keep_rows=1.5), "keep_rows 1.5 must be a whole number from 0 to 1"),
    (dict(width=48, height=32, keep_rows=1), "keep_rows needs a reference image"),
    (dict(width=48, height=32, region=ONE_CELL), "a region redraw needs a reference image"),
    (dict(reference=SOURCE, width=32, height=32, keep_rows=1), "the reference is 48x32 but the output is 32x32"),
    (dict(reference=SOURCE, width=96, height=32, region=torch.ones(32, 96)),
     "the reference is 48x32 but the output is 96x32"),
    (dict(reference=SOURCE, region=torch.ones(32, 32)), "the region mask is 32x32 but the output is 48x32"),
    (dict(reference=SOURCE, region=torch.zeros(32, 48)), "the region mask is all zero: nothing to redraw"),
    (dict(reference=SOURCE, region=ONE_CELL, grow=-1), "grow -1 must be a whole number >= 0"),
    (dict(reference=SOURCE, keep_rows=1, grow=2), "grow 2 widens a region, but no region was given"),
    (dict(reference=SOURCE, region=torch.ones(2, 32, 48)), "region mask has shape (2, 32, 48)"),
    (dict(reference=SOURCE, region="mask.png"), "region of type str is not a mask tensor"),
    (dict(reference=LatentImage(torch.zeros(1, 8, 4, 6)), keep_rows=1),
     "the reference LatentImage has 8 channels but this model's image tokenizer makes 16"),
    (dict(reference=LatentImage(LATENT), width=48, height=48, keep_rows=1),
     "the reference is 48x32 but the output is 48x48"),
]


@pytest.mark.parametrize("kw,message", BAD_INPUT, ids=[m[:40] for _, m in BAD_INPUT])
def test_bad_given_input_is_refused_before_any_model_work(pipe_1_1, kw, message, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("model work before the checks")

    monkeypatch.setattr(pipe_1_1, "prefill", no_model_work)
    monkeypatch.setattr(pipe_1_1.image_tokenizer, "encode", no_model_work)
    with pytest.raises(NextStepError) as caught:
        pipe_1_1.generate("a red circle", steps=2, **kw)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_edit_and_latent_inputs(pipe_1_1):
    with pytest.raises(NextStepError, match=r"the reference is 48x32 but the output is 32x32"):
        pipe_1_1.generate("<image> make it blue", image=SOURCE.resize((32, 32)), reference=SOURCE, region=ONE_CELL)
    with pytest.raises(NextStepError, match="the edit image LatentImage has 8 channels"):
        pipe_1_1.generate("<image> make it blue", image=LatentImage(torch.zeros(1, 8, 4, 6)))
    with pytest.raises(NextStepError, match=r"LatentImage's latent has shape \(16, 4, 6\); expected \(1, channels"):
        LatentImage(torch.zeros(16, 4, 6))
    with pytest.raises(NextStepError, match="expected a float tensor"):
        LatentImage(torch.zeros(1, 16, 4, 6, dtype=torch.long))
    with pytest.raises(NextStepError, match="NaN or infinite"):
        LatentImage(torch.full((1, 16, 4, 6), float("nan")))
    with pytest.raises(NextStepError, match="not a PIL image, an image tensor or a LatentImage"):
        pipe_1_1.generate("a red circle", reference=np.zeros((32, 48, 3)), keep_rows=1)


def recorded_noise(monkeypatch):
    blocks = []
    original = token_loop.NoiseStream.draw
    monkeypatch.setattr(token_loop.NoiseStream, "draw", lambda self: blocks.append(original(self)) or blocks[-1])
    return blocks


@pytest.mark.parametrize("pipe_name", ["pipe_1_0", "pipe_1_1"])
def test_latent_edit_equals_the_pixel_edit_and_draws_the_same_noise(pipe_name, request, monkeypatch):
    """Both tiny tokenizers are deterministic, so the pixel path's edit rows hold the image's
    encoding (its posterior draw is multiplied away), which a LatentImage of that encoding
    hands over as it is. For 1.0 the LatentImage path still draws (and drops) that posterior
    noise from the seeded stream, so every token's noise is the pixel path's. The pixel path
    encodes the image once per image-carrying row (2 per image: cond and uncond_text) in one
    batch, and a convolution's rounding may depend on the batch size (~1e-7 here), so the
    latent is taken from an encoding of that batch."""
    pipe = request.getfixturevalue(pipe_name)
    assert pipe.image_tokenizer.config.deterministic
    batch = pipe.image_tokenizer.encode(image_to_pixels(SOURCE).expand(4, -1, -1, -1))
    assert all(torch.equal(row, batch[0]) for row in batch)
    latent = LatentImage(batch[:1])
    kw = dict(steps=3, seed=3, cfg=5.0, cfg_img=2.0, num_images=2, decode=False)
    blocks = recorded_noise(monkeypatch)
    from_pixels = pipe.generate("<image> make it blue", image=SOURCE, **kw)
    pixel_noise, blocks[:] = list(blocks), []
    from_latent = pipe.generate("<image> make it blue", image=latent, **kw)
    assert len(pixel_noise) == len(blocks) > 0
    assert all(torch.equal(a, b) for a, b in zip(pixel_noise, blocks))
    assert torch.equal(from_pixels.tokens, from_latent.tokens)
    masked = pipe.generate("<image> make it blue", image=latent, region=ONE_CELL, **kw)
    assert torch.equal(masked.tokens[0, masked.given], latent_tokens(latent)[masked.given])


def latent_tokens(latent):
    from nextstep_core.engine.model import patchify

    return patchify(latent.latent)[0]


def test_latent_edit_skips_the_posterior_draw_on_1_1_and_makes_it_on_1_0(pipe_1_0, pipe_1_1, monkeypatch):
    calls = []
    original = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(tuple(a[0])) or original(*a, **k))
    for pipe in (pipe_1_0, pipe_1_1):
        latent = LatentImage(torch.zeros(1, 16, 4, 6))
        calls.clear()
        pipe.generate("<image> make it blue", image=latent, steps=2, cfg=5.0, cfg_img=2.0, decode=False)
        posterior = [c for c in calls if len(c) == 4]
        assert posterior == ([(2, 16, 4, 6)] if pipe is pipe_1_0 else [])  # the image rows: cond and uncond_text


# ----- the CLI -----


@pytest.fixture
def files(tmp_path):
    SOURCE.save(tmp_path / "ref.png")
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[20, 40] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small_mask.png")
    return tmp_path


def cli(model, *flags, out):
    return main(["generate", "--model", str(model), "--steps", "2", "--seed", "4", "--quiet", *flags,
                 "--out", str(out)])


@pytest.mark.parametrize("flags,api", [
    (["--prompt", "a red circle", "--keep-rows", "1", "--reference", "REF"], dict(keep_rows=1, reference=SOURCE)),
    (["--prompt", "a red circle", "--region", "MASK", "--grow", "1", "--reference", "REF"],
     dict(region="MASK", grow=1, reference=SOURCE)),
    (["--prompt", "<image> make it blue", "--image", "REF", "--region", "MASK"], dict(image=SOURCE, region="MASK")),
])
def test_cli_given_flags_write_what_the_api_makes(tiny_model_1_1, pipe_1_1, files, flags, api, capsys):
    flags = [str(files / "ref.png") if f == "REF" else str(files / "mask.png") if f == "MASK" else f for f in flags]
    assert cli(tiny_model_1_1, *flags, out=files / "out.png") == 0, capsys.readouterr().err
    api = {k: Image.open(files / "mask.png") if v == "MASK" else v for k, v in api.items()}
    expected = pipe_1_1.generate(flags[1], steps=2, seed=4, **api).to_pil()[0]
    with Image.open(files / "out.png") as written:
        assert written.size == (48, 32)
        assert np.array_equal(np.asarray(written), np.asarray(expected))


@pytest.mark.parametrize("flags,message", [
    (["--keep-rows", "1"], "keep_rows needs a reference image"),
    (["--keep-rows", "1", "--reference", "REF", "--region", "MASK"], "keep_rows and region cannot be used together"),
    (["--keep-rows", "5", "--reference", "REF"], "keep_rows 5 must be a whole number from 0 to 1"),
    (["--region", "SMALL", "--reference", "REF"], "the region mask is 32x32 but the output is 48x32"),
    (["--region", "MISSING", "--reference", "REF"], "region mask"),
    (["--reference", "MISSING", "--keep-rows", "1"], "reference image"),
    (["--region", "MASK", "--reference", "REF", "--grow", "-2"], "grow -2 must be a whole number >= 0"),
])
def test_cli_given_errors_are_one_line_with_exit_code_2(tiny_model_1_1, files, flags, message, capsys):
    names = {"REF": "ref.png", "MASK": "mask.png", "SMALL": "small_mask.png", "MISSING": "missing.png"}
    flags = [str(files / names[f]) if f in names else f for f in flags]
    code = cli(tiny_model_1_1, "--prompt", "a red circle", *flags, out=files / "out.png")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (files / "out.png").exists()
