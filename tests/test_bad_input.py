"""Bad input gets one line naming what to fix, exit code 2 and no output file; odd but valid input
works. Through the CLI (in-process, as `python -m nextstep_core generate` runs it) and the
Python API, which share nextstep_core/checks.py."""

import math

import numpy as np
import pytest
from PIL import Image

from nextstep_core import NextStepError
from nextstep_core.checks import check_device, check_image_size, check_number, read_image
from nextstep_core.cli import main


def run(args, capsys):
    code = main(["generate", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture
def cli_base(tiny_model_1_1, tmp_path):
    return ["--model", str(tiny_model_1_1), "--prompt", "a red circle", "--steps", "2", "--width", "32",
            "--height", "32", "--quiet"]


@pytest.mark.parametrize("flags,message", [
    (["--width", "1000"], "width 1000 is not a multiple of 16"),
    (["--width", "0"], "width 0 must be a positive whole number of pixels"),
    (["--height", "-16"], "height -16 must be a positive whole number of pixels"),
    (["--cfg", "nan"], "cfg nan must be a finite number (1 turns text guidance off)"),
    (["--cfg", "inf"], "cfg inf must be a finite number (1 turns text guidance off)"),
    (["--cfg", "0.5"], "cfg 0.5 must be >= 1 (1 turns text guidance off)"),
    (["--cfg-img", "nan"], "cfg_img nan must be a finite number (1 turns image guidance off)"),
    (["--shift", "inf"], "shift inf must be a finite number"),
    (["--shift", "-1"], "shift -1.0 must be > 0"),
    (["--noise-level", "2"], "noise level 2.0 must be <= 1"),
    (["--noise-level", "nan"], "noise level nan must be a finite number"),
    (["--num-images", "0"], "number of images 0 must be a whole number >= 1"),
    (["--steps", "0"], "steps 0 must be a whole number >= 1"),
    (["--device", "cuda"], "device cuda is not available"),
    (["--device", "gpu0"], "device 'gpu0' is not a device name (cpu, cuda, cuda:1, mps)"),
    (["--image", "MISSING"], "does not exist"),
])
def test_bad_flags_give_one_line_and_exit_code_2(flags, message, cli_base, tmp_path, capsys):
    out = tmp_path / "out.png"
    flags = [str(tmp_path / "missing.png") if f == "MISSING" else f for f in flags]
    code, err = run([*cli_base, *flags, "--out", str(out)], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not any(tmp_path.glob("*.png")) and not any(tmp_path.glob(".*partial"))


def bad_images(folder):
    (folder / "a_folder.png").mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image\n")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return {"a_folder.png": "is a folder, not an image file", "empty.png": "is empty",
            "text.png": "cannot be read as an image", "truncated.png": "cannot be read as an image"}


def test_unreadable_input_images_are_named(cli_base, tmp_path, capsys):
    for name, message in bad_images(tmp_path).items():
        code, err = run([*cli_base, "--prompt", "<image> make it blue", "--image", str(tmp_path / name),
                         "--out", str(tmp_path / "out.png")], capsys)
        assert code == 2 and len(err) == 1 and str(tmp_path / name) in err[0] and message in err[0], err
    assert not (tmp_path / "out.png").exists()


def test_output_path_that_is_a_folder(cli_base, tmp_path, capsys):
    code, err = run([*cli_base, "--out", str(tmp_path)], capsys)
    expected = f"error: output {tmp_path} is a folder: give a file name such as {tmp_path / 'out.png'}"
    assert code == 2 and err == [expected]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16"])
def test_odd_but_valid_input_images_work(mode, tiny_root_1_0, tiny_model_1_0, tmp_path, capsys):
    size = (32, 16)
    if mode == "I;16":
        image = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16))
    else:
        image = Image.new("RGBA", size, (200, 10, 10, 128)).convert(mode)
    image.save(tmp_path / "in.png")
    assert image.mode == mode or (mode == "I;16" and image.mode.startswith("I;16"))
    rgb = read_image(tmp_path / "in.png")
    assert rgb.mode == "RGB" and rgb.size == size
    if mode == "I;16":  # 16-bit values scale to 8 bits: 40000 / 257 = 155.6
        assert set(np.asarray(rgb).reshape(-1).tolist()) == {155}
    code, err = run(["--model", str(tiny_model_1_0), "--vae", str(tiny_root_1_0 / "NextStep-1-f8ch16-Tokenizer"),
                     "--prompt", "<image> make it blue", "--image", str(tmp_path / "in.png"), "--steps", "2",
                     "--quiet", "--out", str(tmp_path / "out.png")], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == size


def test_empty_and_non_ascii_prompts_work(cli_base, tmp_path, capsys):
    for number, prompt in enumerate(["", "un cercle rouge à gauche, 赤い円 🙂"]):
        out = tmp_path / f"out{number}.png"
        code, err = run([*cli_base, "--prompt", prompt, "--out", str(out)], capsys)
        assert code == 0, err
        assert out.is_file() and not any(tmp_path.glob(".*partial"))


def test_the_python_api_raises_the_same_errors(pipe_1_1):
    for kwargs, message in [(dict(cfg=math.nan), "cfg nan must be a finite number"),
                            (dict(width=16.5), "width 16.5 must be a positive whole number"),
                            (dict(steps=2.5), "steps 2.5 must be a whole number >= 1"),
                            (dict(num_images=True), "number of images True must be a whole number >= 1"),
                            (dict(shift=math.inf), "shift inf must be a finite number")]:
        arguments = dict(width=32, height=32, steps=2) | kwargs
        with pytest.raises(NextStepError, match=message.replace("(", r"\(").replace(")", r"\)")):
            pipe_1_1.generate("a red circle", **arguments)


def test_checks_directly():
    assert check_image_size(48, 32, 16) == (2, 3)
    assert check_number("cfg", 3, minimum=1) == 3.0
    with pytest.raises(NextStepError, match="cfg '3' is not a number"):
        check_number("cfg", "3")
    assert check_device("cpu").type == "cpu"
    with pytest.raises(NextStepError, match="device mps is not available on this machine; use --device cpu"):
        check_device("mps")


@pytest.fixture(scope="module")
def broken_models(tiny_model_1_1, tmp_path_factory):
    from broken_models import write_broken_models

    return write_broken_models(tiny_model_1_1, tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("name", ["empty", "truncated", "garbage", "missing-shard", "mismatched-config",
                                  "no-tokenizer", "no-image-tokenizer", "pickle"])
def test_broken_model_folders_give_one_line(name, broken_models, tmp_path, capsys):
    folder, message = broken_models[name]
    code, err = run(["--model", str(folder), "--prompt", "a red circle", "--steps", "2", "--quiet",
                     "--out", str(tmp_path / "out.png")], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out.png").exists()
    assert not (folder.parent / f"{folder.name}-code-ran").exists()  # the pickle's code never ran


def test_prompt_markers_through_the_cli(cli_base, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    cases = [(["--prompt", "<image> make it blue"], "the prompt has an `<image>` marker but no input image was given"),
             (["--prompt", "make it blue", "--image", str(image)],
              "an input image was given but the edit prompt has no `<image>` marker"),
             (["--prompt", "<image> <image> make it blue", "--image", str(image)],
              "the edit prompt has 2 `<image>` markers; use exactly one")]
    for flags, message in cases:
        code, err = run([*cli_base, *flags, "--out", str(tmp_path / "out.png")], capsys)
        assert code == 2 and err == [f"error: {message}"], err
