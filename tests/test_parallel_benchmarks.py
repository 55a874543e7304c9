"""benchmarks/parallel_decoding.py and gpu_check_parallel.py run (tiny shapes, no timing read):
the keys the device run writes, the device correctness flags (true on the CPU), the predicted
grid passes against the schedule's formula, and the seam statistic on made-up images."""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check_parallel  # noqa: E402
import parallel_decoding  # noqa: E402


def test_gpu_check_part_dry_run():
    report = gpu_check_parallel.measure(torch.device("cpu"), dry=True)
    flags = report["correctness"]
    assert all(flags[k] is True for k in flags if k.startswith(("full_window", "w1_graph", "w2_graph")))
    assert (flags["w1_forward_passes"], flags["w2_forward_passes"]) == (2 * 1 + 3, 2 * 2 + 3)
    sweep = report["pass_sweep"]
    assert sorted(sweep["ms_per_pass"]) == [1, 2, 4, 8, 16] and sweep["per_token_ratio"][1] == 1.0
    grid = sweep["grid_32"]
    for w in (0, 1, 2, 4, 8, 16):
        assert grid[f"w{w}"]["passes"] == 31 * (w or 32) + 31
    assert grid["w0"]["max_queries"] == 1 and grid["w1"]["max_queries"] == 32  # step 31: every row active
    assert grid["w0"]["speedup"] == 1.0


def test_seam_statistic_counts_off_palette_pixels_by_column():
    pixels = np.full((48, 64, 3), 255, dtype=np.uint8)  # white: a palette colour
    pixels[16:, :16] = (128, 77, 200)  # off-palette in the column-0 cells of rows 1..2
    column0, other = parallel_decoding.seam_rates(Image.fromarray(pixels), (64, 48))
    assert (column0, other) == (1.0, 0.0)


def test_changed_statistic_compares_palette_labels_by_column():
    sequential = np.full((48, 64, 3), 255, dtype=np.uint8)
    moved = sequential.copy()
    moved[16:32, :16] = (0, 0, 255)  # a palette colour (blue) in one column-0 cell of row 1
    column0, other = parallel_decoding.changed_rates(Image.fromarray(moved), Image.fromarray(sequential), (64, 48))
    assert (column0, other) == (0.5, 0.0)  # one of the two column-0 cells of rows 1..2


def test_walltime_reports_every_configuration_against_sequential():
    from nextstep_core import DEMO_MODEL, NextStepPipeline

    report = parallel_decoding.walltime(NextStepPipeline.from_folder(DEMO_MODEL), size=(64, 64), repeats=1,
                                        windows=(0, 2), count=1)
    names = ["w0", "w2", "anneal", "w2_anneal"]  # windows[1:3] also annealed
    assert list(report["seconds_per_image"]) == names and list(report["speedup_over_w0"]) == names
    assert all(report["seconds_per_image"][n] > 0 for n in names)
    assert report["speedup_over_w0"]["w0"] == 1.0
    assert report["floor"] == max(2, NextStepPipeline.from_folder(DEMO_MODEL).sampler_settings().steps // 3)
