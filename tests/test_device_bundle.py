"""The preparation of the one device call (benchmarks/README.md, "GPU check"): gpu_check's
authors_cpu part (benchmarks/gpu_check_authors.py) on its dry path with the authors' code in a
bundle folder, its budget plan and skips; benchmarks/device_run.sh's one-line refusals."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import authors_compare  # noqa: E402
import gpu_check_authors  # noqa: E402
from authors_code import MIRROR, authors_transformers, have_mirror  # noqa: E402


def fake_code(folder: Path) -> Path:
    """A folder that passes the part's presence check (nothing in it is run)."""
    (folder / "nextstep" / "models").mkdir(parents=True)
    (folder / "nextstep" / "models" / "pipeline_nextstep.py").write_text("")
    return folder


@have_mirror
@authors_transformers
def test_authors_cpu_dry_run_with_a_bundled_folder(tmp_path):
    commit = authors_compare.bundle_authors(str(MIRROR), tmp_path / "code")
    head = subprocess.run(["git", "-C", str(MIRROR), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert commit == head.strip() and len(commit) == 40
    assert (tmp_path / "code" / authors_compare.COMMIT_FILE).read_text() == commit + "\n"

    out = tmp_path / "device" / "gpu_check.json"
    part = gpu_check_authors.check(out, dry=True, elapsed=0.0, code=tmp_path / "code")
    for key in ("ratio_min", "ratio_median"):
        assert isinstance(part[key], float) and part[key] > 0, (key, part[key])
    assert part["met"] == (part["ratio_median"] <= 0.5) and part["target"] == 0.5
    ours, authors = part["ours_s"], part["authors_s"]
    assert part["ratio_median"] == pytest.approx(ours["median_s"] / authors["median_s"], abs=1e-3)
    cpu = part["cpu"]
    assert cpu["label"].startswith("native-") and isinstance(cpu["amx"], bool)
    assert (cpu["label"] == "native-amx") == cpu["amx"]
    assert cpu["model"] and cpu["threads"] >= 1
    assert part["settings"]["dry_run"] is True and part["settings"]["repeats"] == 1
    assert part["plan"] == {"dry_run": True} and part["env"] == {"CUDA_VISIBLE_DEVICES": ""}
    assert part["authors_source"] == {"from": "--authors-code", "path": str((tmp_path / "code").resolve()),
                                      "commit": commit}
    # as tests/test_authors_compare.py: the same image to a pixel level's rounding
    assert part["images"]["values"] == 32 * 32 * 3 and part["images"]["max_abs_diff"] <= 1
    assert part["json"] == "gpu_check_authors.json"
    # no NEXTSTEP_AUTHORS_PYTHONPATH here: both processes find the same libraries
    assert part["versions"]["ours"] == part["versions"]["authors"]
    assert all(isinstance(part["versions"]["ours"][name], str) for name in ("torch", "transformers", "diffusers"))
    whole = json.loads((out.parent / "gpu_check_authors.json").read_text())["runs"][cpu["label"]]
    assert whole["ratio_median"] == part["ratio_median"] and whole["authors_commit"] == commit


@have_mirror
@authors_transformers
def test_budget_seconds_stops_the_repeats_and_says_so(tmp_path):
    """32x32, 2 steps, warm-up 1, repeats 3 asked with a 1 s budget: the first repeat always runs
    (a result is needed), the second would end past the budget, so it stops there."""
    authors_compare.bundle_authors(str(MIRROR), tmp_path / "code")
    out = tmp_path / "compare.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "authors_compare.py"), "--authors-code",
                           str(tmp_path / "code"), "--size", "32", "--steps", "2", "--warmup", "1", "--repeats", "3",
                           "--budget-seconds", "1", "--quiet", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = next(iter(json.loads(out.read_text())["runs"].values()))
    assert result["budget"] == {"seconds": 1.0, "repeats_asked": 3,
                                "stopped": "after 1 of 3 repeats: one more would end past --budget-seconds"}
    assert result["settings"]["repeats"] == 1 and result["settings"]["warmup"] == 1
    assert len(result["ours"]["runs_s"]) == len(result["authors"]["runs_s"]) == 1


def test_authors_cpu_is_skipped_without_the_code(tmp_path):
    part = gpu_check_authors.check(tmp_path / "gpu_check.json", dry=True, elapsed=0.0, code=tmp_path / "none")
    assert part == {"skipped": f"the authors' code is not in {tmp_path / 'none'} (make it with "
                               "scripts/device_bundle.sh and carry .device)"}


def test_plan_takes_the_most_repeats_that_fit():
    # SETUP_S 20 + (warm-up + repeats) x pair + SLACK_S 15 within what is left
    assert gpu_check_authors.plan(420, 68.0) == (1, 3)  # 20 + 4 x 68 + 15 = 307
    assert gpu_check_authors.plan(250, 68.0) == (1, 2)  # 239
    assert gpu_check_authors.plan(210, 68.0) == (1, 1)  # 171; 239 would not fit
    assert gpu_check_authors.plan(120, 68.0) == (0, 1)  # 103; a warm-up would make it 171
    assert gpu_check_authors.plan(100, 68.0) is None


def test_over_budget_the_part_records_why_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    part = gpu_check_authors.check(out, dry=False, elapsed=380.0, code=fake_code(tmp_path / "code"))
    pair = gpu_check_authors.pair_estimate()["pair_s"]
    assert part["skipped"] == f"over budget: 40s of gpu_check's 420s left, one run of each needs about " \
                              f"{20 + pair + 15:.0f}s"
    assert part["plan"]["left_s"] == 40.0 and part["plan"]["asked"] == {"warmup": 1, "repeats": 3}
    assert not (tmp_path / "gpu_check_authors.json").exists()


def test_pair_estimate_is_the_slowest_committed_pair(tmp_path):
    runs = json.loads(gpu_check_authors.FIGURES.read_text())["runs"].values()
    slowest = max(r["ours"]["median_s"] + r["authors"]["median_s"] for r in runs if not r["settings"]["dry_run"])
    assert gpu_check_authors.pair_estimate()["pair_s"] == round(slowest, 1)
    assert gpu_check_authors.pair_estimate(tmp_path / "none.json")["pair_s"] == 10.5 + 57.5


def test_budget_seconds_stops_only_when_the_next_pair_would_end_past_it():
    over = authors_compare.over_budget
    assert over(argparse.Namespace(budget_seconds=1.0), [5.0]) is True  # this process is already older than 0 s
    assert over(argparse.Namespace(budget_seconds=1e6), [5.0]) is False
    assert over(argparse.Namespace(budget_seconds=None), [5.0]) is False
    assert over(argparse.Namespace(budget_seconds=1.0), []) is False  # nothing measured yet: no judgement


def device_run(folder: Path, env: dict) -> subprocess.CompletedProcess:
    """benchmarks/device_run.sh copied into `folder`/benchmarks (it works from the folder above it)."""
    (folder / "benchmarks").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "benchmarks" / "device_run.sh", folder / "benchmarks" / "device_run.sh")
    return subprocess.run(["bash", str(folder / "benchmarks" / "device_run.sh")], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", **env})


def test_device_run_without_the_bundle_says_so_in_one_line(tmp_path):
    done = device_run(tmp_path, {"OUT": str(tmp_path / "out")})
    assert done.returncode == 2
    assert done.stderr == ("device_run: no .device/wheels here: run scripts/device_bundle.sh before the call and "
                           "name .device in carry\n")
    assert done.stdout == "" and not (tmp_path / "out").exists()


def test_device_run_outside_the_device_tool_needs_out_or_the_dry_mode(tmp_path):
    (tmp_path / ".device" / "wheels").mkdir(parents=True)
    done = device_run(tmp_path, {})
    assert done.returncode == 2
    assert done.stderr == ("device_run: OUT is not set (the device tool sets it; DEVICE_RUN_DRY=1 for a "
                           "rehearsal)\n")
    assert done.stdout == ""
