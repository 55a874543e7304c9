#!/usr/bin/env bash
# One command from a fresh machine: make a venv, install the engine's and the tests'
# dependencies, lint (ruff), run the test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: the CPU build of 2.13.0 (the ranges in requirements.txt then keep it).
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements-test.txt
# Lint first: a ruff finding (rules in pyproject.toml) fails the run before the tests start.
.venv/bin/ruff check .
.venv/bin/python -m pytest -q --durations=10 "$@" tests --ignore=tests/comfy
# The ComfyUI layer, tested inside a real ComfyUI 0.3.75 server (its own venv: .venv-comfy).
bash scripts/comfy_env.sh
.venv-comfy/bin/python -m pytest -q tests/comfy
