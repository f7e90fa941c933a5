#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and no network (torch and triton preinstalled, e.g.
# torch 2.11 + triton 3.6), install this checkout with the CUDA extension, check that the extension
# loads, run the whole test suite on CUDA, the sm_80/sm_90 compile tables (CUDA and Triton) and the
# GPU benchmark (forward; then forward + backward), and write everything to OUTPUT_DIR.
#
#   scripts/gpu_check.sh OUTPUT_DIR [extra bench_gpu.py arguments of the forward run, e.g. --quick]
#
# The benchmark runs twice: the forward (--mode fwd, the sizes the extra arguments give: --quick
# keeps it short) into OUTPUT_DIR/bench, and forward + backward (--mode fwdbwd, which also times the
# backward alone) of dense and kNN memory attention into OUTPUT_DIR/bench_fwdbwd, at fixed quick
# sizes (FWDBWD_ARGS below: one training-like shape, Lq = Lk = 2048, M 16k and 64k, D=128, Hq=Hkv=8)
# where the goal "Triton dense backward >= 0.5x the throughput of torch SDPA's flash backward" is
# read: CSV rows kernel=dense_attention, provider=triton, mode=backward, metric=ratio_to_sdpa.
# FWDBWD_ARGS="..." replaces those arguments; FWDBWD_ARGS=skip leaves the run out.
#
# The install builds the CUDA extension with FOT_KERNELS_BUILD_CUDA=1 (default), so that a missing
# nvcc fails the install loudly instead of silently skipping the CUDA kernels and their tests;
# FOT_KERNELS_BUILD_CUDA=0 builds without it (the extension step then says "skipped"). MAX_JOBS
# (default 8) bounds the parallel nvcc compiles. A failed step is recorded and the later steps
# still run (a missing extension leaves the Triton parts to run); OUTPUT_DIR/summary.txt lists every
# step's exit code.
#
# Exit status: 0 only if every step succeeded; 2 without a CUDA device.
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
BUILD_CUDA=${FOT_KERNELS_BUILD_CUDA:-1}
JOBS=${MAX_JOBS:-8}
# about a minute on an H100-class GPU (estimate: 2 points x 8 providers x 2 phases of ~0.5 s, plus the
# gate's compiles and the baselines' first calls)
FWDBWD_ARGS=${FWDBWD_ARGS:---kernels dense_attention knn_attention --m 16k 64k --lq 2048 --dim 128 --k 32 --heads 8}
unset TRITON_INTERPRET  # the kernels must run compiled on the GPU, not in the interpreter

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse HEAD 2>/dev/null || echo "not a git checkout"
    nvidia-smi || echo "nvidia-smi unavailable"
    command -v nvcc && nvcc --version || echo "nvcc not on PATH"
    "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
    echo "FOT_KERNELS_BUILD_CUDA=$BUILD_CUDA MAX_JOBS=$JOBS"
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "no CUDA device visible to torch: this check needs a GPU" >&2
    exit 2
}

STEPS=()  # "name rc" per step, in order
record() {  # record NAME RC
    STEPS+=("$1 $2")
    echo "-- $1: rc=$2"
}

echo "== install (no network: --no-build-isolation --no-deps; FOT_KERNELS_BUILD_CUDA=$BUILD_CUDA MAX_JOBS=$JOBS)"
FOT_KERNELS_BUILD_CUDA=$BUILD_CUDA MAX_JOBS=$JOBS "$PY" -m pip install --no-build-isolation --no-deps -e . \
    >"$OUT/install.log" 2>&1
record install $?
tail -n 5 "$OUT/install.log"

echo "== CUDA extension"
if [ "$BUILD_CUDA" = "0" ]; then
    echo "skipped: FOT_KERNELS_BUILD_CUDA=0 (the CUDA backend is not built; its tests skip)" | tee "$OUT/cuda_extension.txt"
    record cuda_extension skipped
else
    "$PY" -c "
import sys
from fot_kernels.backends import cuda
why = cuda.extension_status()
print('fot_kernels._C loads' if why is None else 'CUDA extension unavailable: ' + why)
sys.exit(0 if why is None else 1)
" 2>&1 | tee "$OUT/cuda_extension.txt"
    record cuda_extension "${PIPESTATUS[0]}"
fi

echo "== tests (whole suite, CUDA)"
"$PY" -m pytest tests -ra -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
record tests "${PIPESTATUS[0]}"

echo "== sm_80/sm_90 compile table: CUDA extension (nvcc)"
"$PY" tests/test_cuda_compile.py 2>&1 | tee "$OUT/cuda_compile_table.txt"
record cuda_compile_table "${PIPESTATUS[0]}"

echo "== sm_80/sm_90 compile table: Triton kernels"
"$PY" tests/test_triton_compile.py 2>&1 | tee "$OUT/triton_compile_table.txt"
record triton_compile_table "${PIPESTATUS[0]}"

echo "== GPU benchmark (benchmarks/bench_gpu.py)"
"$PY" benchmarks/bench_gpu.py --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log"
record bench "${PIPESTATUS[0]}"

if [ "$FWDBWD_ARGS" = "skip" ]; then
    echo "== GPU benchmark, forward + backward: skipped (FWDBWD_ARGS=skip)"
    record bench_fwdbwd skipped
else
    echo "== GPU benchmark, forward + backward (bench_gpu.py --mode fwdbwd $FWDBWD_ARGS)"
    # shellcheck disable=SC2086  # FWDBWD_ARGS is a list of words
    "$PY" benchmarks/bench_gpu.py --out "$OUT/bench_fwdbwd" --mode fwdbwd $FWDBWD_ARGS 2>&1 | tee "$OUT/bench_fwdbwd.log"
    record bench_fwdbwd "${PIPESTATUS[0]}"
fi

FAILED=0
SUMMARY="summary: exit code per step ('skipped' is not a failure)"
for step in "${STEPS[@]}"; do
    read -r name rc <<<"$step"
    if [ "$rc" = "skipped" ] || [ "$rc" = "0" ]; then
        SUMMARY+=$'\n'"  $name rc=$rc"
    else
        SUMMARY+=$'\n'"  $name rc=$rc  FAILED"
        FAILED=1
    fi
done
echo "$SUMMARY" | tee "$OUT/summary.txt"
if [ "$FAILED" -ne 0 ]; then
    echo "gpu_check: some steps failed (see $OUT/summary.txt)" >&2
    exit 1
fi
echo "gpu_check: all steps passed"
exit 0
