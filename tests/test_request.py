"""The request type (nextstep_core/request.py): resolved against a model folder without loading it.

The CLI resolves before it loads: a folder whose config and tokenizer are fine but whose weights
do not fit its config (tests/broken_models.py's mismatched-config: its load fails) gives every
bad setting's own one-line message, not the load error, so the setting was refused before any
weight was read. The Python API's request form and its flat keywords make the same images.
"""

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nextstep_core import Given, Guidance, NextStepError, Output, Request, Sampling, resolve
from nextstep_core.cli import main
from nextstep_core.engine.checkpoint import inspect_model_folder
from nextstep_core.pipeline import NextStepPipeline

sys.path.insert(0, str(Path(__file__).parent))
from broken_models import copy_of, mismatched_config  # noqa: E402

LOAD_ERROR = "does config.json belong to these weights?"


@pytest.fixture(scope="module")
def unloadable(tiny_model_1_1, tmp_path_factory):
    """A copy of the tiny 1.1 model whose config no longer fits its weights: inspecting it and its
    tokenizer work, loading its weights fails."""
    folder = copy_of(tiny_model_1_1, tmp_path_factory.mktemp("unloadable") / "model")
    mismatched_config(folder)
    return folder


def run_cli(folder, flags, tmp_path, capsys):
    code = main(["generate", "--model", str(folder), "--prompt", "a red circle", "--steps", "2", "--width", "32",
                 "--height", "32", "--quiet", *flags, "--out", str(tmp_path / "out.png")])
    return code, capsys.readouterr().err.strip().splitlines()


def test_the_unloadable_folder_fails_only_when_loaded(unloadable, tmp_path, capsys):
    code, err = run_cli(unloadable, [], tmp_path, capsys)
    assert code == 2 and len(err) == 1 and LOAD_ERROR in err[0], err
    resolved = resolve(inspect_model_folder(unloadable), Request(output=Output(size=(32, 32))), "a red circle")
    assert resolved.token_grid == (2, 2)


# The CLI's rows of tests/README.md's tables of bad settings (a model folder's own breakage is a
# load error by nature: tests/test_bad_input.py).
BAD_SETTINGS = [
    (["--width", "1000"], "width 1000 is not a multiple of 16"),
    (["--width", "0"], "width 0 must be a positive whole number of pixels"),
    (["--height", "-16"], "height -16 must be a positive whole number of pixels"),
    (["--width", "1024", "--height", "1024"], "needs 4096 image tokens plus"),
    (["--cfg", "nan"], "cfg nan must be a finite number (1 turns text guidance off)"),
    (["--cfg", "0.5"], "cfg 0.5 must be >= 1 (1 turns text guidance off)"),
    (["--cfg-img", "inf"], "cfg_img inf must be a finite number (1 turns image guidance off)"),
    (["--shift", "inf"], "shift inf must be a finite number"),
    (["--shift", "-1"], "shift -1.0 must be > 0"),
    (["--noise-level", "nan"], "noise level nan must be a finite number"),
    (["--noise-level", "2"], "noise level 2.0 must be <= 1"),
    (["--steps", "0"], "steps 0 must be a whole number >= 1"),
    (["--num-images", "0"], "number of images 0 must be a whole number >= 1"),
    (["--prompt", "<image> a red circle"], "the prompt has an `<image>` marker but no input image was given"),
    (["--image", "IMAGE"], "an input image was given but the edit prompt has no `<image>` marker"),
    (["--image", "IMAGE", "--prompt", "<image><image> green"], "the edit prompt has 2 `<image>` markers"),
    (["--negative", "no <image>"], "the negative prompt has an `<image>` marker"),
    (["--device", "gpu0"], "device 'gpu0' is not a device name (cpu, cuda, cuda:1, mps)"),
    (["--image", "MISSING"], "does not exist"),
    (["--keep-rows", "1", "--region", "MASK", "--reference", "IMAGE"], "keep_rows and region cannot be used together"),
    (["--keep-rows", "3", "--reference", "IMAGE"], "keep_rows 3 must be a whole number from 0 to 1"),
    (["--keep-rows", "1"], "keep_rows needs a reference image"),
    (["--region", "MASK"], "a region redraw needs a reference image"),
    (["--region", "WIDE_MASK", "--reference", "IMAGE"], "the region mask is 48x32 but the output is 32x32"),
    (["--grow", "-1", "--region", "MASK", "--reference", "IMAGE"], "grow -1 must be a whole number >= 0"),
    (["--grow", "2"], "grow 2 widens a region, but no region was given"),
    (["--reference", "MISSING", "--keep-rows", "1"], "reference image"),
    (["--parallel-window", "-1"], "parallel_window -1 must be a whole number >= 0"),
    (["--head-steps-floor", "99"], "head_steps_floor 99 is above the sampler's"),
]


@pytest.mark.parametrize("flags, message", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_the_cli_refuses_every_bad_setting_before_loading(flags, message, unloadable, tmp_path, capsys):
    files = {"IMAGE": (32, 32), "MASK": (32, 32), "WIDE_MASK": (48, 32)}
    for name, size in files.items():
        Image.new("RGB", size, (255, 255, 255)).save(tmp_path / f"{name}.png")
    flags = [str(tmp_path / f"{f}.png") if f in (*files, "MISSING") else f for f in flags]
    code, err = run_cli(unloadable, flags, tmp_path, capsys)
    assert code == 2
    assert len(err) == 1 and message in err[0] and LOAD_ERROR not in err[0], err
    assert not (tmp_path / "out.png").exists()


def test_resolve_fills_the_folders_defaults(tiny_model_1_0, tiny_model_1_1):
    files = inspect_model_folder(tiny_model_1_1)
    r = resolve(files, Request(output=Output(size=(48, 32), num_images=2, seed=5)), ["a", "b"])
    assert (r.settings.name, r.settings.steps, r.settings.shift) == ("sde", 28, 1.0)
    assert (r.cfg, r.cfg_img, r.use_norm, r.schedule) == (files.version.cfg, 1.0, False, "constant")
    assert (r.token_grid, r.num_images, r.seed, r.prompts, r.rows) == ((2, 3), 2, 5, ["a", "b"], None)
    edit = Request(image=torch.zeros(32, 16, 3), sampling=Sampling(sampler="heun"), guidance=Guidance(cfg_img=None))
    r = resolve(inspect_model_folder(tiny_model_1_0), edit, "<image> make it green")
    assert (r.settings.name, r.settings.steps, r.settings.shift, r.cfg_img, r.use_norm) == ("heun", 4, 3.2, 2.0, True)
    assert (r.token_grid, r.edit_grid) == ((2, 1), (2, 1))  # the size is the edit image's
    with pytest.raises(NextStepError, match="give both width and height"):
        resolve(files, Request(output=Output(size=(32, None))), "x")


def test_flat_keywords_file_under_their_groups():
    region = torch.ones(32, 32)
    request = Request.from_keywords(width=48, height=32, cfg_schedule="linear", steps=3, keep_rows=0, region=region,
                                    num_images=2, negative="blur", use_norm=True)
    assert request.output == Output(size=(48, 32), num_images=2)
    assert request.guidance == Guidance(schedule="linear")
    assert request.sampling == Sampling(steps=3, use_norm=True)
    assert request.given.region is region and request.negative == "blur"
    assert request.updated(height=64).output.size == (48, 64)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        Request.from_keywords(widht=48)


def test_generate_has_at_most_12_parameters():
    assert len(inspect.signature(NextStepPipeline.generate).parameters) <= 12


def test_the_request_form_and_the_flat_keywords_make_the_same_image(pipe_1_1):
    flat = pipe_1_1.generate("a red circle", width=32, height=48, steps=3, cfg=3.0, seed=4, cfg_schedule="linear",
                             sampler="dpm2m", num_images=2)
    request = Request(sampling=Sampling(sampler="dpm2m", steps=3), guidance=Guidance(cfg=3.0, schedule="linear"),
                      output=Output(size=(32, 48), num_images=2, seed=4))
    typed = pipe_1_1.generate("a red circle", request)
    assert torch.equal(flat.tokens, typed.tokens) and torch.equal(flat.images, typed.images)
    over = pipe_1_1.generate("a red circle", request, seed=5)  # keywords on top of a request
    assert not torch.equal(over.tokens, typed.tokens)
    assert torch.equal(over.tokens, pipe_1_1.generate("a red circle", request.updated(seed=5)).tokens)


def test_given_tokens_in_the_request_form(pipe_1_1):
    reference = pipe_1_1.generate("a red circle", width=32, height=32, steps=2, seed=1)
    request = Request(sampling=Sampling(steps=2), given=Given(reference=reference.to_pil()[0], keep_rows=1),
                      output=Output(seed=2))
    result = pipe_1_1.generate("a blue square", request)
    assert result.token_grid == (2, 2) and result.given.tolist() == [True, True, False, False]


def test_the_sizes_in_the_config_are_read_not_assumed(tiny_model_1_1, tmp_path):
    """A tokenizer that downsamples 4x (three ch_mult levels) makes 8-pixel tokens: resolve reads it."""
    folder = copy_of(tiny_model_1_1, tmp_path / "model")
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["ch_mult"] = config["ch_mult"][:3]
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    assert resolve(inspect_model_folder(folder), Request(output=Output(size=(24, 8))), "x").token_grid == (1, 3)
