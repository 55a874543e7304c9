#!/usr/bin/env bash
# One command from a fresh machine: make a venv, install the engine's and the tests'
# dependencies, run the test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: the CPU build of 2.13.0 (the ranges in requirements.txt then keep it).
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements-test.txt
.venv/bin/python -m pytest -q "$@" tests --ignore=tests/comfy
# The ComfyUI layer, tested inside a real ComfyUI 0.3.75 server (its own venv: .venv-comfy).
bash scripts/comfy_env.sh
.venv-comfy/bin/python -m pytest -q tests/comfy
