"""The authors_cpu part of benchmarks/gpu_check.py (issue 25's AMX point): on the device machine's
own CPU (an Intel Xeon with AMX, where it is one), benchmarks/authors_compare.py --cpu native
times our CLI against the authors' 1.0 pipeline, in a child process, with the authors' code that
scripts/device_bundle.sh extracted into .device/authors (no git or mirror is needed there). The
GPU is hidden from both (CUDA_VISIBLE_DEVICES=""): the CPU is measured as on a CPU-only machine.

It runs last and keeps inside gpu_check's whole budget (BUDGET_S, about 7 minutes from the
process start; NEXTSTEP_AUTHORS_BUDGET_S sets another, for a shorter rerun of this part alone): it
estimates a pair of runs (ours + the authors') from the 2-core figures in
benchmarks/authors_compare.json, assumed no faster on the device's cores (the tiny model's small
operations gain little from more threads), asks for as many of warm-up 1 + repeats 3 as fit, and
passes the rest of the budget on (--budget-seconds), so authors_compare also stops early on the
times it measures. What it asked for and did is recorded under `plan`. The whole result goes to
<out stem>_authors.json beside gpu_check's --out; the summary to report["authors_cpu"].

NEXTSTEP_AUTHORS_PYTHONPATH, when set (benchmarks/device_run.sh sets it), is the authors' process's
PYTHONPATH alone (authors_compare --authors-pythonpath): there it leaves out the transformers wheel
the bundle carries for our engine, so their code runs on the image's own transformers; the
versions each process found are recorded under `versions`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ROOT / ".device" / "authors"  # scripts/device_bundle.sh writes it
FIGURES = ROOT / "benchmarks" / "authors_compare.json"
BUDGET_S = float(os.environ.get("NEXTSTEP_AUTHORS_BUDGET_S", 420))  # gpu_check's whole run, from its start
SETUP_S = 20.0  # authors_compare's own start, the CPU probe and the tiny checkpoint, estimated
SLACK_S = 15.0  # writing and cleaning up after the last run
PAIR_FALLBACK_S = 10.5 + 57.5  # 2026-12-07, 2 cores, AMD EPYC (benchmarks/README.md)
REPEATS, WARMUP = 3, 1


def pair_estimate(figures: Path = FIGURES) -> dict:
    """Seconds of one (ours, authors) pair: the slowest recorded, not dry, of the committed figures."""
    try:
        runs = json.loads(figures.read_text())["runs"].values()
        pairs = [r["ours"]["median_s"] + r["authors"]["median_s"] for r in runs if not r["settings"]["dry_run"]]
    except (OSError, KeyError, ValueError):
        pairs = []
    if not pairs:
        return {"pair_s": PAIR_FALLBACK_S, "from": "fallback constant (2-core figures of 2026-12-07)"}
    return {"pair_s": round(max(pairs), 1), "from": f"{figures.name}, slowest of {len(pairs)} runs, 2 cores"}


def plan(left: float, pair: float) -> tuple[int, int] | None:
    """(warmup, repeats): the most of WARMUP + REPEATS that fits `left` seconds, warm-up kept first."""
    for warmup in (WARMUP, 0):
        for repeats in range(REPEATS, 0, -1):
            if SETUP_S + (warmup + repeats) * pair + SLACK_S <= left:
                return warmup, repeats
    return None


def run_streaming(command: list[str], env: dict, timeout: float) -> tuple[int, list[str]]:
    """Run `command` in its own process group, its stderr passed on line by line (the live log) and
    the last lines kept; the whole group is killed at `timeout` (its own children too)."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    killed = []

    def kill():
        killed.append(True)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    tail: list[str] = []
    try:
        for line in process.stderr:
            print(f"  authors_compare: {line.rstrip()}", file=sys.stderr, flush=True)
            tail = (tail + [line.rstrip()])[-12:]
        process.wait()
    finally:
        timer.cancel()
    if killed:
        tail.append(f"killed after {timeout:.0f}s (the part's share of the budget)")
    return process.returncode, tail


def summarize(result: dict) -> dict:
    cpu, images = result["cpu"], result["images"]
    return {
        "ratio_min": result["ratio_min"], "ratio_median": result["ratio_median"], "target": result["target"],
        "met": result["met"],
        "cpu": {"label": cpu["label"], "model": cpu["hardware"]["model"], "amx": cpu["hardware"]["amx"],
                "avx512_bf16": cpu["hardware"]["avx512_bf16"], "capability": cpu["capability"],
                "threads": cpu["threads"], "torch": cpu["torch"]},
        "ours_s": result["ours"], "authors_s": result["authors"],
        "images": {k: images.get(k) for k in ("max_abs_diff", "mean_abs_diff", "differing_values", "values",
                                               "repeats_identical")},
        "settings": result["settings"], "authors_source": result["authors_source"],
        "authors_in_process_s": result["authors_in_process_s"], "budget": result.get("budget"),
        "versions": result["versions"],
    }


def check(out: Path, dry: bool, elapsed: float, code: Path = CODE, budget: float = BUDGET_S) -> dict:
    """The part: `elapsed` seconds of gpu_check's budget are spent; the dry run ignores the budget."""
    if not (code / "nextstep" / "models" / "pipeline_nextstep.py").is_file():
        return {"skipped": f"the authors' code is not in {code} (make it with scripts/device_bundle.sh and carry "
                           ".device)"}
    result_path = Path(out).with_name(Path(out).stem + "_authors.json")
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(ROOT / "benchmarks" / "authors_compare.py"), "--cpu", "native",
               "--authors-code", str(code), "--out", str(result_path)]
    estimate = pair_estimate()
    left = budget - elapsed
    if dry:
        command.append("--dry-run")
        timeout, planned = 600.0, {"dry_run": True}
    else:
        chosen = plan(left, estimate["pair_s"])
        planned = {**estimate, "budget_s": budget, "left_s": round(left, 1), "setup_s": SETUP_S,
                   "asked": {"warmup": WARMUP, "repeats": REPEATS}}
        if chosen is None:
            return {"skipped": f"over budget: {left:.0f}s of gpu_check's {budget:.0f}s left, one run of each needs "
                               f"about {SETUP_S + estimate['pair_s'] + SLACK_S:.0f}s", "plan": planned}
        warmup, repeats = chosen
        planned["chosen"] = {"warmup": warmup, "repeats": repeats}
        command += ["--warmup", str(warmup), "--repeats", str(repeats), "--budget-seconds", f"{left - SLACK_S:.0f}"]
        timeout = left
    if os.environ.get("NEXTSTEP_AUTHORS_PYTHONPATH") is not None:
        command += ["--authors-pythonpath", os.environ["NEXTSTEP_AUTHORS_PYTHONPATH"]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    returncode, tail = run_streaming(command, env, timeout)
    if returncode != 0 or not result_path.is_file():
        raise RuntimeError(f"authors_compare.py exited {returncode}: " + " | ".join(tail[-6:]))
    result = next(iter(json.loads(result_path.read_text())["runs"].values()))
    return {**summarize(result), "plan": planned, "json": result_path.name,
            "env": {"CUDA_VISIBLE_DEVICES": ""}, "command": " ".join(command[1:]).replace(str(ROOT) + "/", "")}
