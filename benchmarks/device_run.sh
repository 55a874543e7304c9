#!/usr/bin/env bash
# The whole device command, THERE (the lent GPU machine), after scripts/device_bundle.sh HERE:
#   run(command="bash benchmarks/device_run.sh", carry=[".device"], timeout_s=480)
# 1. installs the carried wheels (.device/wheels, .device/wheels-ours) into $SITE without network
#    and puts it first on PYTHONPATH; .device/wheels alone into $SITE-authors, the PYTHONPATH of the
#    authors' process in gpu_check's authors_cpu part (NEXTSTEP_AUTHORS_PYTHONPATH; see
#    scripts/device_bundle.sh for why the two differ); 2. writes $OUT/machine.txt: the CPU (model, AMX flags, cores), the GPU (nvidia-smi),
#    python and the versions of requirements.txt's packages against their ranges; 3. runs
#    benchmarks/gpu_check.py (every part; authors_cpu last, with .device/authors) with its log teed
#    to $OUT/gpu_check.log, unbuffered, so that what was done comes back even if the call is killed:
#    $OUT/gpu_check.json (rewritten after every part), $OUT/gpu_check_authors.json (authors_compare's
#    whole result), $OUT/gpu_check.log, $OUT/machine.txt: four files, under the 8 that come back.
# DEVICE_RUN_DRY=1: the same steps on any CPU with gpu_check's --dry-run, OUT and SITE defaulting to
# temporary folders (the rehearsal here, benchmarks/README.md "GPU check"). DEVICE_PYTHON picks the
# interpreter (default python3); DEVICE_RUN_LIMIT caps gpu_check in seconds (default 450).
# Extra arguments go to gpu_check.py (e.g. --parts authors_cpu for a rerun of that part alone).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${DEVICE_PYTHON:-python3}
DRY=${DEVICE_RUN_DRY:-0}
LIMIT=${DEVICE_RUN_LIMIT:-450}

if [ ! -d .device/wheels ]; then
    echo "device_run: no .device/wheels here: run scripts/device_bundle.sh before the call and name .device in carry" >&2
    exit 2
fi
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-$(mktemp -d /tmp/device_run.XXXXXX)}
    SITE=${SITE:-$(mktemp -d /tmp/device_site.XXXXXX)}
    dry=(--dry-run)
else
    if [ -z "${OUT:-}" ]; then echo "device_run: OUT is not set (the device tool sets it; DEVICE_RUN_DRY=1 for a rehearsal)" >&2; exit 2; fi
    SITE=${SITE:-/tmp/site}
    dry=()
fi
mkdir -p "$OUT"
echo "device_run: OUT=$OUT SITE=$SITE python=$PY dry=$DRY"

install() {  # target folder, wheels...
    local target=$1
    shift
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@"; then
        echo "device_run: the carried wheels did not install into $target (pip's message above)" >&2
        exit 3
    fi
}
shopt -s nullglob
install "$SITE" .device/wheels/*.whl .device/wheels-ours/*.whl
install "$SITE-authors" .device/wheels/*.whl
export NEXTSTEP_AUTHORS_PYTHONPATH="$SITE-authors${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NEXTSTEP_COMMIT=$(sed -n 's/^commit //p' .device/MANIFEST 2>/dev/null)
export NEXTSTEP_COMMIT

{
    echo "date $(date -u '+%Y-%m-%d %H:%M:%S UTC')  dry=$DRY  bundle: $(tr '\n' ';' < .device/MANIFEST 2>/dev/null)"
    echo "cpu model: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "cpu cores (nproc): $(nproc)  logical in /proc/cpuinfo: $(grep -c ^processor /proc/cpuinfo)"
    flags=$(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -1)
    echo "cpu amx flags: $(tr ' ' '\n' <<< "$flags" | grep '^amx' | tr '\n' ' ')"
    echo "cpu avx512 flags: $(tr ' ' '\n' <<< "$flags" | grep -c '^avx512') (avx512_bf16: $(tr ' ' '\n' <<< "$flags" | grep -cx avx512_bf16))"
    echo "--- nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo "--- python and packages (requirements.txt ranges)"
    "$PY" - <<'PYEOF' 2>&1
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement

print("python", sys.version.split()[0], sys.executable)
for line in Path("requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        print(f"{req.name}: MISSING (wanted {req.specifier})")
        continue
    ok = req.specifier.contains(version.split("+")[0], prereleases=True)
    print(f"{req.name} {version}: {'ok' if ok else 'OUTSIDE'} {req.specifier}")
from nextstep_core.engine.model import check_decoder_api
from nextstep_core.errors import NextStepError

try:
    check_decoder_api()  # the engine's own check, run when a model is built
    print("transformers decoders take cache=: yes")
except NextStepError as refused:
    print(f"transformers decoders take cache=: NO: {refused}")
for name in ("torchvision", "einops", "tabulate", "huggingface-hub", "regex", "packaging"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
PYEOF
    echo "the authors' process (PYTHONPATH=$NEXTSTEP_AUTHORS_PYTHONPATH): transformers $(PYTHONPATH=$NEXTSTEP_AUTHORS_PYTHONPATH \
        "$PY" -c 'import importlib.metadata as m; print(m.version("transformers"))' 2>&1)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "device_run: gpu_check (at most ${LIMIT}s) -> $OUT/gpu_check.json"
timeout --kill-after=15 "$LIMIT" "$PY" benchmarks/gpu_check.py "${dry[@]}" --out "$OUT/gpu_check.json" "$@" 2>&1 \
    | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
echo "device_run: gpu_check exited $status; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$status"
