#!/usr/bin/env bash
# scripts/gpu_check.sh: build and check tropd's CUDA backend on a machine WITH a GPU.
#
#   1. configure build/gpu-check with TROPD_ENABLE_CUDA=ON for this machine's GPU only
#      (CMAKE_CUDA_ARCHITECTURES from nvidia-smi's compute capability, else "native");
#   2. build the CUDA targets (tropd-cuda-all: every tests/gpu/*.cu and tropd-bench-gpu) and,
#      when the target exists, tropd-bench-cpu;
#   3. ctest -L gpu --output-on-failure (tropd-gpu-tests: every GPU path against the CPU backend);
#   4. tropd-bench-gpu (cudaEvent timings referenced to a device-to-device cudaMemcpy of the
#      same bytes) and, if built, a short filtered run of tropd-bench-cpu;
#   5. a table: kernel, shape, GB/s, fraction of the D2D copy bandwidth.
# Budget: about 4-6 minutes on an H100 (16 cores): one architecture, no host unit tests,
# 5 timed repetitions per kernel, a narrow CPU benchmark filter with a timeout.
#
# Environment: TROPD_GPU_BUILD_DIR (default build/gpu-check), TROPD_CUDA_ARCH (e.g. 90),
# TROPD_JOBS (default: nproc), TROPD_BENCH_REPS (default 5), TROPD_CPU_BENCH_FILTER,
# TROPD_CPU_BENCH_TIMEOUT (seconds, default 120). Exit status: non-zero if the configure,
# the build or any GPU test failed (benchmark problems are reported, not fatal).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

BUILD=${TROPD_GPU_BUILD_DIR:-build/gpu-check}
JOBS=${TROPD_JOBS:-$(nproc 2>/dev/null || echo 4)}
REPS=${TROPD_BENCH_REPS:-5}
CPU_FILTER=${TROPD_CPU_BENCH_FILTER:-'^(rkl|jsd|topk_fkl_lists)/tropd/(fp32|bf16)/V:128256/N:256/t:1(/|$)'}
CPU_TIMEOUT=${TROPD_CPU_BENCH_TIMEOUT:-120}
LOG_DIR=$BUILD/gpu-check-logs
start=$SECONDS

stamp() { printf '[gpu_check %4ds] %s\n' $((SECONDS - start)) "$*"; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check.sh: no GPU visible (nvidia-smi failed); this script is for a machine with a GPU." >&2
  echo "  Without a GPU, build and compile-check with: scripts/test.sh (stage cuda) or" >&2
  echo "  cmake -S . -B build/cuda -G Ninja -DTROPD_ENABLE_CUDA=ON && cmake --build build/cuda" >&2
  exit 2
fi
nvidia-smi -L

ARCH=${TROPD_CUDA_ARCH:-}
if [[ -z $ARCH ]]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  if [[ $cap =~ ^[0-9]+$ ]]; then ARCH=$cap; else ARCH=native; fi
fi
GEN=Ninja
command -v ninja >/dev/null 2>&1 || GEN="Unix Makefiles"
mkdir -p "$LOG_DIR"

stamp "configure $BUILD (CUDA architectures: $ARCH, generator: $GEN)"
if ! cmake -S . -B "$BUILD" -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DTROPD_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DTROPD_BUILD_EXAMPLES=OFF >"$LOG_DIR/configure.log" 2>&1; then
  tail -n 30 "$LOG_DIR/configure.log"
  echo "gpu_check.sh: configure failed (needs nvcc, Eigen 3.4, doctest, Google Benchmark: scripts/setup.sh)" >&2
  exit 1
fi

targets=(tropd-cuda-all)
if cmake --build "$BUILD" --target help 2>/dev/null | grep -q 'tropd-bench-cpu'; then
  targets+=(tropd-bench-cpu)
fi
stamp "build ${targets[*]} (-j $JOBS)"
if ! cmake --build "$BUILD" -j "$JOBS" --target "${targets[@]}" >"$LOG_DIR/build.log" 2>&1; then
  grep -E 'error|Error' "$LOG_DIR/build.log" | head -n 40
  echo "gpu_check.sh: build failed, see $LOG_DIR/build.log" >&2
  exit 1
fi

stamp "ctest -L gpu"
(cd "$BUILD" && ctest -L gpu --output-on-failure) 2>&1 | tee "$LOG_DIR/ctest.log"
test_rc=${PIPESTATUS[0]}
if grep -qE '\(Skipped\)' "$LOG_DIR/ctest.log"; then
  echo "gpu_check.sh: WARNING: the GPU tests were skipped (the test binary saw no CUDA device)" >&2
  test_rc=1
fi

stamp "tropd-bench-gpu --reps $REPS"
bench_gpu=$BUILD/bin/tropd-bench-gpu
if [[ -x $bench_gpu ]]; then
  "$bench_gpu" --reps "$REPS" 2>&1 | tee "$LOG_DIR/bench-gpu.log"
else
  echo "gpu_check.sh: $bench_gpu was not built" >&2
fi

bench_cpu=$BUILD/bin/tropd-bench-cpu
if [[ -x $bench_cpu ]]; then
  stamp "tropd-bench-cpu (filter $CPU_FILTER, timeout ${CPU_TIMEOUT}s)"
  timeout "$CPU_TIMEOUT" "$bench_cpu" --benchmark_filter="$CPU_FILTER" 2>&1 | tee "$LOG_DIR/bench-cpu.log" ||
    echo "gpu_check.sh: tropd-bench-cpu stopped early (timeout or error); partial output in $LOG_DIR/bench-cpu.log"
else
  stamp "tropd-bench-cpu not built (no benchmarks/bench_cpu.cpp yet): skipped"
fi

echo
echo "==== tropd GPU kernels vs a device-to-device cudaMemcpy of the same bytes ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)) ===="
if [[ -f $LOG_DIR/bench-gpu.log ]] && grep -q '^RESULT ' "$LOG_DIR/bench-gpu.log"; then
  printf '%-9s %-5s %-16s %9s %9s %11s %9s\n' kernel dtype "shape NxV" ms GB/s "copy GB/s" "of copy"
  grep '^RESULT ' "$LOG_DIR/bench-gpu.log" | while read -r _ k d n v ms gbs cgbs frac; do
    printf '%-9s %-5s %-16s %9.3f %9.1f %11.1f %8.1f%%\n' "$k" "$d" "${n}x${v}" "$ms" "$gbs" "$cgbs" \
      "$(awk -v f="$frac" 'BEGIN { print 100 * f }')"
  done
  echo "(GB/s counts each input byte read once and each output byte written once: the floor; docs/gpu.md)"
else
  echo "no GPU benchmark results"
fi
stamp "done (GPU tests: $([[ $test_rc -eq 0 ]] && echo passed || echo FAILED))"
exit "$test_rc"
