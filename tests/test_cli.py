"""The CLI, run as a user runs it: `python -m nextstep_core generate ...` in a subprocess."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nextstep_core", "generate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_pngs_of_the_requested_size(tiny_model_1_1, tmp_path):
    out = tmp_path / "pics" / "out.png"
    done = run_cli("--model", str(tiny_model_1_1), "--prompt", "a red circle on the left", "--width", "48",
                   "--height", "32", "--num-images", "2", "--steps", "3", "--seed", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    for name in ("out_0.png", "out_1.png"):
        with Image.open(out.parent / name) as image:
            assert image.size == (48, 32) and image.mode == "RGB"
    assert "as NextStep-1.1" in done.stderr


def test_cli_edit_on_a_1_0_layout(tiny_root_1_0, tiny_model_1_0, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (32, 48), (200, 10, 10)).save(source)
    out = tmp_path / "edited.png"
    done = run_cli("--model", str(tiny_model_1_0), "--vae", str(tiny_root_1_0 / "NextStep-1-f8ch16-Tokenizer"),
                   "--prompt", "<image> make it blue", "--image", str(source), "--steps", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.size == (32, 48)


def test_cli_errors_name_the_flag(tiny_model_1_1, tmp_path):
    done = run_cli("--model", str(tiny_model_1_1), "--prompt", "x", "--width", "1000", "--out", str(tmp_path / "o.png"))
    assert done.returncode == 2
    assert done.stderr.strip().endswith("error: width 1000 is not a multiple of 16")
    done = run_cli("--model", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert done.returncode == 2 and "model folder" in done.stderr and "does not exist" in done.stderr


def test_cli_without_model_mentions_the_demo_model(tmp_path):
    from nextstep_core import DEMO_MODEL

    done = run_cli("--prompt", "a red circle", "--width", "32", "--height", "32", "--steps", "2",
                   "--out", str(tmp_path / "demo.png"))
    if (DEMO_MODEL / "config.json").is_file():
        assert done.returncode == 0, done.stderr
        with Image.open(tmp_path / "demo.png") as image:
            assert image.size == (32, 32)
    else:
        assert done.returncode == 2
        assert "no --model given and the embedded demo model is not shipped yet" in done.stderr
