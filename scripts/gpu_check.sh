#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and no network (torch and triton preinstalled, e.g.
# torch 2.11 + triton 3.6), install this checkout, run the whole test suite on CUDA, the sm_80/sm_90
# compile table and the GPU benchmark, and write everything to OUTPUT_DIR.
#
#   scripts/gpu_check.sh OUTPUT_DIR [extra bench_gpu.py arguments, e.g. --quick]
#
# Exit status: 0 only if the install, the tests and the benchmark all succeeded.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTPUT_DIR [bench_gpu.py arguments...]" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
unset TRITON_INTERPRET  # the kernels must run compiled on the GPU, not in the interpreter

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse HEAD 2>/dev/null || echo "not a git checkout"
    nvidia-smi || echo "nvidia-smi unavailable"
    "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "no CUDA device visible to torch: this check needs a GPU" >&2
    exit 2
}

echo "== install (no network: --no-build-isolation --no-deps)"
"$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1
INSTALL_RC=$?
tail -n 3 "$OUT/install.log"

echo "== tests (whole suite, CUDA)"
"$PY" -m pytest tests -ra -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
TEST_RC=${PIPESTATUS[0]}

echo "== sm_80/sm_90 compile table"
"$PY" tests/test_triton_compile.py 2>&1 | tee "$OUT/compile_table.txt"

echo "== GPU benchmark"
"$PY" benchmarks/bench_gpu.py --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

{
    echo "install rc=$INSTALL_RC"
    echo "tests rc=$TEST_RC"
    echo "bench rc=$BENCH_RC"
} | tee "$OUT/summary.txt"
[ "$INSTALL_RC" -eq 0 ] && [ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
