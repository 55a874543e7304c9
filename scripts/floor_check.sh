#!/usr/bin/env bash
# The engine's test suite on the LOWEST versions requirements.txt allows (each ">=X" taken as
# "==X"), in its own venv (.venv-floor, ignored), so a floor that does not work cannot hide behind
# the newer versions scripts/test.sh installs. Not part of CI (the torch floor is a CUDA build
# from PyPI, ~3 GB with its nvidia libraries); run it after changing a range or an API use:
#     bash scripts/floor_check.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
floors=$(sed -n 's/^\([A-Za-z0-9_.-]*\)>=\([0-9][0-9.]*\).*/\1==\2/p' requirements.txt)
[ -n "$floors" ] || { echo "floor_check: no 'name>=version' lines in requirements.txt" >&2; exit 2; }
python3 -m venv .venv-floor
.venv-floor/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # one argument per requirement
.venv-floor/bin/python -m pip install -q $floors "pytest>=8,<10"
echo "floor_check: $(echo $floors | tr '\n' ' ')"
.venv-floor/bin/python -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|diffusers|safetensors|accelerate|tokenizers|numpy|pillow) '
.venv-floor/bin/python -m pytest -q -p no:cacheprovider -rs "$@" tests --ignore=tests/comfy
