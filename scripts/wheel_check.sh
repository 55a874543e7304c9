#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it into a clean venv, generate the demo image
# from a folder outside the checkout, and check the PNG against the checkout's own run.
# Usage: bash scripts/wheel_check.sh   (after scripts/test.sh has built .venv)
#
# The clean venv has no access to the checkout or to any other site-packages; the wheel goes in
# without its dependencies (--no-deps), which come from .venv's site-packages through one .pth
# line, so torch is not downloaded or installed a second time. The check asserts that
# nextstep_core is imported from the clean venv, not from the checkout or .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY="${NEXTSTEP_PYTHON:-$REPO/.venv/bin/python}"  # the engine's venv (NEXTSTEP_PYTHON: another one)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

# Build from a copy of the sources, so that the build leaves nothing in the checkout.
mkdir "$work/src"
tar --exclude=./.git --exclude='./.venv*' --exclude='*/__pycache__' --exclude=./dist --exclude=./build -cf - . \
    | tar -xf - -C "$work/src"
"$PY" -c "import setuptools" 2>/dev/null || "$PY" -m pip install -q "setuptools>=68"  # the build backend
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/comfyui_nextstep-*.whl)

python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --no-index "$wheel"
deps=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$site/nextstep_dependencies.pth"

mkdir "$work/run"
cd "$work/run"
"$work/venv/bin/nextstep" generate --prompt "a large red circle on the left" --seed 3 --out "$work/run/wheel.png"
(cd "$REPO" && "$PY" -m nextstep_core generate --prompt "a large red circle on the left" --seed 3 --quiet \
    --out "$work/run/checkout.png")
"$work/venv/bin/python" - "$work" "$REPO" <<'PYTHON'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import nextstep_core

work, repo = Path(sys.argv[1]), Path(sys.argv[2])
where = Path(nextstep_core.__file__).resolve()
assert where.is_relative_to(work / "venv"), f"nextstep_core came from {where}, not the clean venv"
assert not where.is_relative_to(repo), where
for sub in ("sampling", "engine", "memory", "demo"):  # every subpackage is in the wheel
    assert (where.parent / sub / "__init__.py").is_file(), f"the wheel lacks nextstep_core.{sub}"
for data in ("demo/vocabulary.json", "demo_model/config.json", "demo_model/tokenizer.json", "demo_model/vae/config.json"):
    assert (where.parent / data).is_file(), f"the wheel lacks nextstep_core/{data}"
wheel, checkout = (np.asarray(Image.open(work / "run" / f"{n}.png")) for n in ("wheel", "checkout"))
assert wheel.shape == (64, 64, 3), wheel.shape
assert wheel.std() > 1, "the wheel's image is flat"
assert np.array_equal(wheel, checkout), "the wheel's image differs from the checkout's"
print(f"wheel_check: {where.parent} generated a 64x64 image, equal to the checkout's")
PYTHON
echo "wheel_check: built, installed and generated in $(( $(date +%s) - started ))s"
