#!/usr/bin/env bash
# The first run on a GPU machine, offline: build from source, the GPU tests, the benchmark, then
# the rest of the suite, each phase time-boxed so that one hang cannot eat the whole budget.
#
#   bash scripts/gpu_check.sh OUT_DIR
#
# Writes five files, at most two folders down:
#   OUT_DIR/gpu_check.json   device, and per phase: status (passed/failed/timed_out/skipped/not_selected),
#                            exit code, seconds, limit, the last summary line
#   OUT_DIR/gpu_check.log    every phase's output, one after the other
#   OUT_DIR/bench/results.json, summary.md, throughput.png   the benchmark's output
# Exit status 0 only if every selected phase passed.  Environment (all optional):
#   PYTHON                interpreter (default: .venv/bin/python if present, else python3)
#   GPU_CHECK_BUDGET_S    seconds for all phases together (default 450, under 8 minutes)
#   GPU_CHECK_INSTALL     editable (default: pip install --no-build-isolation --no-deps -e .) or
#                         inplace (setup.py build_ext --inplace, for an environment shared with others)
#   GPU_CHECK_PHASES      phases to run (default: env build gpu-tests bench suite)
#   GPU_CHECK_BENCH_ARGS  extra benchmark arguments (default without CUDA: --quick)
set -uo pipefail

OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BUDGET=${GPU_CHECK_BUDGET_S:-450}
PHASES=${GPU_CHECK_PHASES:-env build gpu-tests bench suite}
LOG=$OUT/gpu_check.log
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
: > "$LOG"
export PYTHON PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAS_CUDA=1
    DEVICE=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
    # Only this GPU's architecture: the build is part of the time budget.
    : "${ADDAX_KERNELS_CUDA_ARCHS:=$("$PYTHON" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'sm_{a}{b}' + ('a' if a >= 9 else ''))")}"
    export ADDAX_KERNELS_CUDA_ARCHS
    BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-}
else
    HAS_CUDA=0
    DEVICE="no CUDA device: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//')"
    export ADDAX_KERNELS_NO_CUDA=1
    BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---quick}
fi
PYTEST_ARGS="-q -p no:cacheprovider -rfE"
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS="$PYTEST_ARGS --timeout=120"; fi
# Test workers compile Triton kernels side by side (each autotuned variant is several compiles);
# one torch thread each, since OpenMP threads beyond the cores slow CPU tests by orders of magnitude.
WORKERS=$(( $(nproc) / 2 < 8 ? $(nproc) / 2 : 8 ))
if (( WORKERS >= 2 )) && "$PYTHON" -c "import xdist" 2>/dev/null; then PYTEST_ARGS="$PYTEST_ARGS -n $WORKERS"; fi

# The phases; run_phase runs each in its own bash under a time limit.
phase_env() {
    nvidia-smi || true
    nvcc --version | tail -2 || true
    "$PYTHON" - <<'PY'
import importlib.metadata as metadata
import sys

import torch

print("python", sys.version.split()[0], "| CUDA", torch.version.cuda, "|",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for name in ("torch", "triton", "transformers", "numpy", "pybind11", "setuptools", "matplotlib", "tqdm", "pytest"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
PY
    echo "ADDAX_KERNELS_CUDA_ARCHS=${ADDAX_KERNELS_CUDA_ARCHS:-} ADDAX_KERNELS_NO_CUDA=${ADDAX_KERNELS_NO_CUDA:-}"
}
phase_build() {
    export ADDAX_KERNELS_REQUIRE_NATIVE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ "${GPU_CHECK_INSTALL:-editable}" = inplace ]; then
        "$PYTHON" setup.py build_ext --inplace -q || return
    else
        "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || return
    fi
    "$PYTHON" -c "
import sys, torch, addax_kernels as ak
report = ak.backend_report('cuda' if torch.cuda.is_available() else 'cpu')
print(report)
sys.exit(0 if report['native'] == 'available' else 1)"
}
# The CPU emulation of the CUDA kernels (tests/cuda_emulation) needs no GPU: it runs with the suite.
phase_gpu_tests() { OMP_NUM_THREADS=1 "$PYTHON" -m pytest $PYTEST_ARGS tests -k "(cuda or gpu) and not emulation"; }
phase_bench() {  # stops starting measurements at BENCH_TIME_LIMIT and still writes its files
    "$PYTHON" -m addax_kernels bench --out "$OUT/bench" --no-progress --time-limit "$BENCH_TIME_LIMIT" $BENCH_ARGS
}
phase_suite() { OMP_NUM_THREADS=1 "$PYTHON" -m pytest $PYTEST_ARGS tests -k "not (cuda or gpu) or emulation"; }
export -f phase_env phase_build phase_gpu_tests phase_bench phase_suite
export OUT PYTEST_ARGS BENCH_ARGS

RECORDS=()
json_string() {  # one line of text as a JSON string
    local text=${1//\\/\\\\}
    text=${text//\"/\\\"}
    text=$(printf '%s' "$text" | tr -d '\000-\037')
    printf '"%s"' "$text"
}

# run_phase NAME CAP_SECONDS: phase_NAME under min(CAP, what is left of the budget).
run_phase() {
    local name=$1 cap=$2 status rc=0 seconds=0 note=""
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=$(( cap < left ? cap : left ))
    if [[ " $PHASES " != *" $name "* ]]; then
        status=not_selected note="not in GPU_CHECK_PHASES"
    elif (( limit < 20 )); then
        status=skipped note="budget spent (${left}s left)"
    else
        echo "==== $name (limit ${limit}s)" >> "$LOG"
        local t0=$(date +%s)
        BENCH_TIME_LIMIT=$(( limit - 30 > 10 ? limit - 30 : 10 )) timeout -k 15 "$limit" \
            bash -c "phase_${name//-/_}" > "$WORK/$name.log" 2>&1
        rc=$?
        seconds=$(( $(date +%s) - t0 ))
        cat "$WORK/$name.log" >> "$LOG"
        if (( rc == 124 || rc == 137 )); then status=timed_out
        elif (( rc == 0 )); then status=passed
        else status=failed; fi
        note=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$WORK/$name.log" | tail -1)
        [ -n "$note" ] || note=$(grep -v '^\s*$' "$WORK/$name.log" | tail -1)
    fi
    printf '%-10s %-12s rc=%-4s %4ss  %s\n' "$name" "$status" "$rc" "$seconds" "${note:0:110}"
    RECORDS+=("{\"name\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $seconds, \"limit_s\": $limit, \"note\": $(json_string "${note:0:500}")}")
}

run_phase env 30
run_phase build 200
run_phase gpu-tests 120
run_phase bench 240
run_phase suite "$BUDGET"

ELAPSED=$(( $(date +%s) - START ))
ALL_PASSED=true
for record in "${RECORDS[@]}"; do
    [[ $record == *'"status": "passed"'* || $record == *'"status": "not_selected"'* ]] || ALL_PASSED=false
done
{
    printf '{\n "device": %s,\n "cuda": %s,\n "started_utc": "%s",\n "elapsed_s": %s,\n "budget_s": %s,\n' \
        "$(json_string "$DEVICE")" "$([ $HAS_CUDA = 1 ] && echo true || echo false)" \
        "$(date -u -d "@$START" +%Y-%m-%dT%H:%M:%SZ)" "$ELAPSED" "$BUDGET"
    printf ' "all_passed": %s,\n "phases": [\n  %s\n ]\n}\n' "$ALL_PASSED" "$(IFS=$'\n'; echo "${RECORDS[*]}" | paste -sd, - | sed 's/},{/},\n  {/g')"
} > "$OUT/gpu_check.json"
[ -f "$OUT/bench/summary.md" ] && { echo "---- $OUT/bench/summary.md"; cat "$OUT/bench/summary.md"; }
echo "---- $OUT/gpu_check.json"
cat "$OUT/gpu_check.json"
[ "$ALL_PASSED" = true ]
