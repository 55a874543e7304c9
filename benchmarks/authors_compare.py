"""Whole-process time of our CLI, with its defaults, against the authors' NextStep-1.0 pipeline
(issue 25): the same tiny 1.0 checkpoint, the same image (512x512, 50 steps, cfg 7.5, float32,
the same seed and prompt), each run a fresh process, so python's start, the imports, the loading,
the generation and the PNG write all count. Target: ours / authors <= 0.5.

    python benchmarks/authors_compare.py --cpu avx2      # AVX2-only CPU, emulated as in the tests
    python benchmarks/authors_compare.py --cpu native    # this CPU as it is (AMX where it has it)
    python benchmarks/authors_compare.py --dry-run       # 32x32, 2 steps, one run each: does it work
    python benchmarks/authors_compare.py --bundle-code DIR   # only extract their code into DIR

The authors' code is extracted at run time from a git mirror of stepfun-ai/NextStep-1
(--authors-repo) into a temporary folder and run from there by benchmarks/authors_pipeline.py
(their NextStepPipeline.generate_image; the loading glue and version bridges there are ours); or,
on a machine with neither git nor the mirror, taken from a folder extracted earlier with
--bundle-code (--authors-code; scripts/device_bundle.sh makes one). Nothing of theirs is copied
into this repository. Runs alternate (ours, authors, ours, ...) after
one untimed warm-up run of each (--warmup); min and median of the wall times and their ratios go
to --out (merged under the CPU's label, so both CPUs' runs can share one file), with the pixel
differences of the two images (max / mean absolute, 0-255).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

STARTED = time.perf_counter()  # the clock of --budget-seconds
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPO = "/work/.mirror/stepfun-ai+NextStep-1/repo"
AVX2_ENV = {"NEXTSTEP_TEST_CPU": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
PROMPT = "a red circle on the left"
TARGET = 0.5
PIPELINE_FILE = Path("nextstep", "models", "pipeline_nextstep.py")
COMMIT_FILE = "authors_commit.txt"  # beside nextstep/ in a --bundle-code folder: the mirror's commit


class Unavailable(Exception):
    """The authors' code cannot be had (no mirror, no git, no nextstep/ in it)."""


def extract_authors(repo: str, into: Path) -> str:
    """`git archive` the mirror's nextstep/ package into `into`; returns the commit."""
    if shutil.which("git") is None:
        raise Unavailable("git is not installed")
    if not Path(repo).exists():
        raise Unavailable(f"no git mirror at {repo} (--authors-repo)")
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        raise Unavailable(f"{repo} is not a git repository ({head.stderr.strip().splitlines()[-1:]})")
    archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", "HEAD", "nextstep"], capture_output=True)
    if archive.returncode != 0:
        raise Unavailable(f"git archive of nextstep/ failed in {repo}: {archive.stderr.decode().strip()[:200]}")
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    if not (into / PIPELINE_FILE).is_file():
        raise Unavailable(f"{repo} has no {PIPELINE_FILE.as_posix()}")
    return head.stdout.strip()


def bundle_authors(repo: str, into: Path) -> str:
    """extract_authors into `into` (emptied first) and write the commit beside nextstep/."""
    if (into / "nextstep").exists():
        shutil.rmtree(into / "nextstep")
    commit = extract_authors(repo, into)
    (into / COMMIT_FILE).write_text(commit + "\n")
    return commit


def read_bundle(folder: str) -> str | None:
    """The checks of extract_authors on a folder extracted earlier; returns the commit written
    beside it by bundle_authors (None when the file is absent)."""
    path = Path(folder)
    if not path.is_dir():
        raise Unavailable(f"no folder at {folder} (--authors-code)")
    if not (path / PIPELINE_FILE).is_file():
        raise Unavailable(f"{folder} has no {PIPELINE_FILE.as_posix()} (--authors-code)")
    commit_file = path / COMMIT_FILE
    if not commit_file.is_file():
        return None
    return commit_file.read_text().strip() or None


def child_env(cpu: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AVX2_ENV}
    if cpu == "avx2":
        env.update(AVX2_ENV)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: no spinning OpenMP threads (README)
    return env


def authors_env(env: dict[str, str], pythonpath: str | None) -> dict[str, str]:
    """The authors' process's environment: ours, with --authors-pythonpath as its PYTHONPATH when given."""
    return env if pythonpath is None else {**env, "PYTHONPATH": pythonpath}


def versions(env: dict[str, str]) -> dict:
    """The library versions a process started with `env` finds (read from their metadata, untimed;
    None for one not installed)."""
    probe = ("import importlib.metadata as m, json, sys\n"
             "def version(name):\n    try:\n        return m.version(name)\n"
             "    except m.PackageNotFoundError:\n        return None\n"
             "print(json.dumps({'python': sys.version.split()[0], "
             "**{n: version(n) for n in ('torch', 'transformers', 'diffusers')}}))")
    return json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                     check=True).stdout)


def cpu_facts(cpu: str, env: dict[str, str]) -> dict:
    """What torch sees under `env` (a separate, untimed process), and the CPU's name and flags."""
    probe = ("import json, torch; print(json.dumps({'capability': torch.backends.cpu.get_cpu_capability(), "
             "'threads': torch.get_num_threads(), 'torch': torch.__version__}))")
    seen = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                     check=True).stdout)
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model, flags = info.get("model name") or platform.machine(), set(info.get("flags", "").split())
    amx = "amx_tile" in flags
    label = "avx2" if cpu == "avx2" else ("native-amx" if amx else f"native-{seen['capability'].lower()}")
    return {"label": label, "hardware": {"model": model, "amx": amx, "avx512_bf16": "avx512_bf16" in flags},
            "emulation_env": AVX2_ENV if cpu == "avx2" else {}, "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY"), **seen}


def build_checkpoint(root: Path) -> tuple[Path, Path]:
    """The tests' tiny 1.0 checkpoint (tests/conftest.py: write_tiny_model(version="1.0", seed=1))."""
    sys.path.insert(0, str(ROOT))
    from nextstep_core.demo.tiny import VAE_FOLDER_1_0, write_tiny_model

    model = write_tiny_model(root, version="1.0", seed=1)
    return model, root / VAE_FOLDER_1_0


def commands(args, model: Path, vae: Path, code: Path, out_dir: Path, k: int) -> dict[str, list[str]]:
    common = ["--prompt", args.prompt, "--steps", str(args.steps), "--cfg", str(args.cfg), "--seed", str(args.seed)]
    ours = [sys.executable, "-m", "nextstep_core", "generate", "--model", str(model), "--vae", str(vae),
            "--out", str(out_dir / f"ours_{k}.png"), "--width", str(args.size), "--height", str(args.size),
            "--dtype", "float32", *common]
    authors = [sys.executable, str(ROOT / "benchmarks" / "authors_pipeline.py"), "--code", str(code),
               "--model", str(model), "--vae", str(vae), "--out", str(out_dir / f"authors_{k}.png"),
               "--size", str(args.size), "--report", str(out_dir / f"authors_{k}.json"), *common]
    if args.authors_compile:
        authors.append("--compile")
    return {"ours": ours, "authors": authors}


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {done.returncode}:\n{tail}")
    return wall


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def compare_images(out_dir: Path, runs: int) -> dict:
    ours, authors = pixels(out_dir / "ours_0.png"), pixels(out_dir / "authors_0.png")
    facts = {"ours_size": [ours.shape[1], ours.shape[0]], "authors_size": [authors.shape[1], authors.shape[0]]}
    if ours.shape == authors.shape:
        diff = np.abs(ours - authors)
        facts.update(max_abs_diff=int(diff.max()), mean_abs_diff=float(diff.mean()),
                     differing_values=int((diff > 0).sum()), values=int(diff.size))
    facts["repeats_identical"] = all(
        np.array_equal(pixels(out_dir / f"{who}_{k}.png"), first)
        for who, first in (("ours", ours), ("authors", authors)) for k in range(1, runs))
    return facts


def summary(times: list[float]) -> dict:
    return {"runs_s": [round(t, 3) for t in times], "min_s": round(min(times), 3),
            "median_s": round(statistics.median(times), 3)}


def over_budget(args, pairs: list[float]) -> bool:
    """--budget-seconds: would one more (ours, authors) pair, as long as the longest so far, end past it?"""
    return bool(args.budget_seconds and pairs and
                time.perf_counter() - STARTED + max(pairs) > args.budget_seconds)


def measure(args, model: Path, vae: Path, code: Path, work: Path, env: dict[str, str]) -> dict:
    out_dir = work / "images"
    out_dir.mkdir(exist_ok=True)
    pairs = []  # wall time of each (ours, authors) pair, warm-ups included
    envs = {"ours": env, "authors": authors_env(env, args.authors_pythonpath)}
    found = {who: versions(e) for who, e in envs.items()}
    for _ in range(args.warmup):  # untimed: the first process of each pays for cold files
        started = time.perf_counter()
        for who, command in commands(args, model, vae, code, out_dir, 0).items():
            timed(command, envs[who], ROOT)
        pairs.append(time.perf_counter() - started)
    times = {"ours": [], "authors": []}
    for k in range(args.repeats):
        if k and over_budget(args, pairs):
            args.stopped = f"after {k} of {args.repeats} repeats: one more would end past --budget-seconds"
            break
        for who, command in commands(args, model, vae, code, out_dir, k).items():
            times[who].append(timed(command, envs[who], ROOT))
            if not args.quiet:
                print(f"{who:8s} run {k + 1}/{args.repeats}: {times[who][-1]:.2f} s", file=sys.stderr)
        pairs.append(times["ours"][-1] + times["authors"][-1])
    ours, authors = summary(times["ours"]), summary(times["authors"])
    ratio_min = ours["min_s"] / authors["min_s"]
    ratio_median = ours["median_s"] / authors["median_s"]
    report = json.loads((out_dir / "authors_0.json").read_text())
    return {"ours": ours, "authors": authors, "ratio_min": round(ratio_min, 3), "ratio_median": round(ratio_median, 3),
            "target": TARGET, "met": ratio_median <= TARGET, "images": compare_images(out_dir, len(times["ours"])),
            "versions": found,
            "authors_glue": {k: report[k] for k in ("stand_ins", "bridged", "compile")},
            "authors_in_process_s": {k: round(v, 3) for k, v in report["in_process_s"].items()}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-repo", default=DEFAULT_REPO, help="git mirror of stepfun-ai/NextStep-1")
    parser.add_argument("--authors-code", metavar="DIR",
                        help="a folder holding the authors' nextstep/ package, made earlier with --bundle-code, "
                             "used instead of extracting it from --authors-repo (no git needed)")
    parser.add_argument("--authors-pythonpath", metavar="PATHS",
                        help="PYTHONPATH of the authors' process alone (default: ours, inherited); the "
                             "versions each process finds are recorded")
    parser.add_argument("--bundle-code", metavar="DIR",
                        help="only extract the authors' nextstep/ package from --authors-repo into DIR, with "
                             f"{COMMIT_FILE}, for a later --authors-code DIR; then exit")
    parser.add_argument("--cpu", choices=["avx2", "native"], default="native",
                        help="avx2: both processes run as on an AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2 "
                             "ONEDNN_MAX_CPU_ISA=AVX2 NEXTSTEP_TEST_CPU=avx2); native: this CPU as it is")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-seconds", type=float,
                        help="start no further repeat (after the first) that would end past this many seconds "
                             "from this process's start, judged by the longest pair so far (recorded)")
    parser.add_argument("--warmup", type=int, help="untimed runs of each before the timed ones (default 1; 0 dry)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--authors-compile", action="store_true",
                        help="leave the authors' torch.compile on (their default; off here, see authors_pipeline.py)")
    parser.add_argument("--out", help="JSON to merge this run into (default benchmarks/authors_compare.json; "
                                      "with --dry-run: none, the result is printed)")
    parser.add_argument("--work", help="folder for the checkpoint, images and the extracted code (default: a "
                                       "temporary one, removed after)")
    parser.add_argument("--dry-run", action="store_true", help="32x32, 2 steps, one run each, no warm-up")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.stopped = None
    if args.dry_run:
        args.size, args.steps, args.repeats = 32, 2, 1
    if args.warmup is None:
        args.warmup = 0 if args.dry_run else 1
    if args.out is None and not args.dry_run:
        args.out = str(ROOT / "benchmarks" / "authors_compare.json")
    return args


def our_commit() -> str | None:
    """This checkout's commit; where git or .git is missing (the device machine), NEXTSTEP_COMMIT
    (benchmarks/device_run.sh sets it from the bundle's manifest), else None."""
    if shutil.which("git") is not None:
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if git.returncode == 0:
            return git.stdout.strip()
    return os.environ.get("NEXTSTEP_COMMIT")


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="authors-compare-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        try:
            if args.bundle_code:
                commit = bundle_authors(args.authors_repo, Path(args.bundle_code))
                print(f"authors' code {commit} from {args.authors_repo} in {args.bundle_code}")
                return 0
            if args.authors_code:
                code, commit = Path(args.authors_code).resolve(), read_bundle(args.authors_code)
                source = {"from": "--authors-code", "path": str(code), "commit": commit}
            else:
                code, commit = work / "authors-code", extract_authors(args.authors_repo, work / "authors-code")
                source = {"from": "--authors-repo", "path": args.authors_repo, "commit": commit}
        except Unavailable as exc:
            print(f"authors' code unavailable: {exc}", file=sys.stderr)
            return 2
        env = child_env(args.cpu)
        cpu = cpu_facts(args.cpu, env)
        model, vae = build_checkpoint(work / "checkpoint")
        result = measure(args, model, vae, code, work, env)
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": our_commit(),
              "command": "python benchmarks/authors_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": cpu, "settings": {"size": args.size, "steps": args.steps, "cfg": args.cfg, "dtype": "float32",
                                       "seed": args.seed, "prompt": args.prompt,
                                       "repeats": len(result["ours"]["runs_s"]), "warmup": args.warmup,
                                       "dry_run": args.dry_run},
              "checkpoint": "tiny 1.0 (nextstep_core/demo/tiny.py TinySpec defaults, seed 1)",
              "authors_commit": commit, "authors_source": source, **result}
    if args.budget_seconds:
        result["budget"] = {"seconds": args.budget_seconds, "repeats_asked": args.repeats, "stopped": args.stopped}
    if args.out:
        path = Path(args.out)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        merged.setdefault("runs", {})[cpu["label"]] = result
        path.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
