"""benchmarks/authors_compare.py end to end (--dry-run: 32x32, 2 steps, one process of each), run
only where the git mirror of the authors' code is on the machine; and its one-line refusal where
it is not."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from authors_code import MIRROR, authors_transformers, have_mirror

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "authors_compare.py"


def run(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_without_the_authors_code_it_says_so_in_one_line(tmp_path):
    done = run("--dry-run", "--authors-repo", str(tmp_path / "none"), "--work", str(tmp_path / "work"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"authors' code unavailable: no git mirror at {tmp_path / 'none'} (--authors-repo)"
    assert done.stdout == ""


def test_an_authors_code_folder_without_their_pipeline_is_refused_in_one_line(tmp_path):
    (tmp_path / "code" / "nextstep" / "models").mkdir(parents=True)  # their package, less the pipeline
    done = run("--dry-run", "--authors-code", str(tmp_path / "code"), "--work", str(tmp_path / "work"))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"authors' code unavailable: {tmp_path / 'code'} has no "
                                   "nextstep/models/pipeline_nextstep.py (--authors-code)")
    assert done.stdout == ""
    done = run("--dry-run", "--authors-code", str(tmp_path / "none"), "--work", str(tmp_path / "work"))
    assert (done.returncode, done.stderr.strip()) == (
        2, f"authors' code unavailable: no folder at {tmp_path / 'none'} (--authors-code)")


@have_mirror
@authors_transformers
def test_dry_run_times_both_and_compares_the_images(tmp_path):
    out = tmp_path / "compare.json"
    done = run("--dry-run", "--quiet", "--out", str(out), "--work", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 1
    label, result = next(iter(runs.items()))
    assert label == result["cpu"]["label"] and label.startswith("native-")
    assert result["settings"] == {"size": 32, "steps": 2, "cfg": 7.5, "dtype": "float32", "seed": 0,
                                  "prompt": "a red circle on the left", "repeats": 1, "warmup": 0, "dry_run": True}
    assert len(result["authors_commit"]) == 40
    assert result["authors_source"] == {"from": "--authors-repo", "path": str(MIRROR),
                                        "commit": result["authors_commit"]}
    for who in ("ours", "authors"):
        times = result[who]
        assert len(times["runs_s"]) == 1 and times["min_s"] == times["median_s"] == times["runs_s"][0] > 0
    assert result["ratio_median"] == pytest.approx(result["ours"]["median_s"] / result["authors"]["median_s"],
                                                   abs=1e-3)
    assert result["met"] == (result["ratio_median"] <= 0.5)
    images = result["images"]
    assert images["ours_size"] == images["authors_size"] == [32, 32]
    assert images["values"] == 32 * 32 * 3
    # Same settings, same seed, same noise stream: the tokens agree to ~1e-5 (attention rounding, see
    # benchmarks/README.md), far below a pixel level (1/255 of the range), so a value can at most
    # round the other way at a .5 boundary: by 1, and rarely.
    assert images["max_abs_diff"] <= 1
    assert images["differing_values"] <= images["values"] // 100
    for name in ("ours_0.png", "authors_0.png"):
        assert (tmp_path / "work" / "images" / name).is_file()
