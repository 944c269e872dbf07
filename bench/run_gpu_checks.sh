#!/usr/bin/env bash
# The CUDA backend's checks on a machine with an NVIDIA GPU, in one go: configure with CUDA, build the CUDA
# library, its tests and the GPU benchmark, run the tests (directly and through ctest, which must report
# them as passed, not skipped) and the benchmark, and print everything with the GPU model and the commands.
#
#   bench/run_gpu_checks.sh                 # from the repository root; BUILD=dir JOBS=n to override
#   BENCH_ARGS=--large-only bench/run_gpu_checks.sh
#
# The log also goes to $OUT/gpu_checks.log when OUT is set (else to the build directory).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${BUILD:-$ROOT/build-gpu}
JOBS=${JOBS:-$(nproc)}
LOG=${OUT:-$BUILD}/gpu_checks.log
mkdir -p "$BUILD" "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1

status=0
step() { echo; echo "==> $*"; "$@"; local rc=$?; [ $rc -eq 0 ] || { echo "!! exit code $rc: $*"; status=1; }; return $rc; }

echo "peft++ GPU checks, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi not available"
/usr/local/cuda/bin/nvcc --version 2>/dev/null | tail -2 || nvcc --version | tail -2

step cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPEFT_ENABLE_CUDA=ON \
  -DPEFT_BUILD_BENCHMARKS=OFF -DPEFT_BUILD_EXAMPLES=ON -DPEFT_BUILD_TOOLS=OFF -DPEFT_BUILD_CUDA_BENCHMARKS=ON \
  -DPEFT_CUDA_TEST_OPTIMIZATION=-O1 || exit 1
step cmake --build "$BUILD" --target peft_cuda test_cuda_lora test_cuda_adapters bench_cuda_lora -j "$JOBS" || exit 1

# the tests: Catch2 directly (with durations), then ctest (0 skipped expected on a GPU machine)
step "$BUILD/tests/test_cuda_lora" --durations yes
step "$BUILD/tests/test_cuda_adapters" --durations yes
step ctest --test-dir "$BUILD" -R '^test_cuda_' --output-on-failure
if ctest --test-dir "$BUILD" -R '^test_cuda_' 2>&1 | grep -qi 'skipped'; then
  echo "!! some CUDA tests were skipped on a machine that should have a GPU"
  status=1
fi

# a whole LoRA training run on the GPU, its adapter checked on the CPU (needs CLI11; the target exists only then)
if cmake --build "$BUILD" --target gpu_lora -j "$JOBS"; then
  step "$BUILD/examples/gpu_lora/gpu_lora" --out "$BUILD/gpu_lora_adapter"
else
  echo "!! gpu_lora not built (CLI11 missing?)"
fi

# the benchmark (a markdown table; targets: base_eff >= 0.95, lora_over_base <= 1.05 at M=4096 D=4096 r=16)
step "$BUILD/bench_cuda_lora" ${BENCH_ARGS:-}
step "$BUILD/bench_cuda_lora" --large-only --dtype=bf16
step "$BUILD/bench_cuda_lora" --large-only --tf32

echo
echo "==> done, status $status (log: $LOG)"
exit $status
