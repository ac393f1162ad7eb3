#!/usr/bin/env bash
# scripts/gpu_check.sh: build and check tropd's CUDA backend on a machine WITH a GPU, including a
# bare one (no network, no Eigen, doctest or Google Benchmark: docs/gpu.md, "Running the GPU
# check on a bare machine").
#
#   0. facts: GPU, driver, clocks, nvcc, host compiler, CMake, cores;
#   1. the dependency prefix build/gpu-deps (Eigen headers + doctest, scripts/pack_gpu_deps.sh):
#      packed here when this machine has the Debian packages, else the carried copy is used;
#   2. configure build/gpu-check: TROPD_ENABLE_CUDA=ON for this GPU's architecture only,
#      CMAKE_PREFIX_PATH = the prefix and, when the prefix is used, the system package paths
#      hidden (the configure reproduced on a machine without a GPU); no -Werror (the device's
#      host compiler may be newer than the one CI uses; warnings are counted instead);
#      -march=native stays (the binaries are built and run on this same machine);
#   3. build tropd-cuda-all (every tests/gpu/*.cu and tropd-bench-gpu);
#   4. ctest -L gpu (tropd-gpu-tests: every GPU path against the CPU backend; 300 s timeout);
#   5. tropd-bench-gpu (cudaEvent timings referenced to a device-to-device copy of the same bytes);
#   6. compute-sanitizer memcheck, racecheck and synccheck on tropd-gpu-tests with small rows
#      (TROPD_GPU_TEST_MAX_V: every code path, vocabularies capped), as the remaining budget allows;
#   7. a table: kernel, shape, GB/s, fraction of the copy bandwidth; a summary line per step.
# No CPU benchmark runs here (GPU time is the scarce resource; run it on the CPU machines).
# Budget: TROPD_GPU_CHECK_BUDGET seconds (default 540) from the start; the optional steps (5, 6)
# get at most what is left of it, and are skipped with a message when under 30 s remain.
# Expected on an H100 with 16 cores: configure + build 1.5-2 min, tests about 1 min, the
# benchmark under 1 min, the sanitizers 1-3 min.
#
# Environment:
#   TROPD_GPU_BUILD_DIR     build directory (default build/gpu-check)
#   TROPD_GPU_DEPS_DIR      dependency prefix (default build/gpu-deps)
#   TROPD_CUDA_ARCH         CUDA architecture(s), e.g. 90 (default: nvidia-smi's compute capability)
#   TROPD_JOBS              build parallelism (default: nproc)
#   TROPD_BENCH_REPS        timed repetitions per kernel (default 5)
#   TROPD_GPU_CHECK_BUDGET  seconds for the whole script (default 540)
#   TROPD_GPU_SANITIZERS    which compute-sanitizer tools (default "memcheck racecheck synccheck"; "" for none)
#   TROPD_GPU_SANITIZE_MAX_V  the vocabulary cap of the sanitizer runs (default 5003)
#   TROPD_GPU_WERROR        ON: warnings as errors (default OFF)
#   TROPD_GPU_MARCH_NATIVE  OFF: no -march=native for host code (default ON; set OFF if the
#                           binaries are to run on another machine)
#   TROPD_GPU_BARE          1: hide the system package paths; 0: do not (default: 1 when the
#                           dependency prefix is used)
#   TROPD_GPU_BUILD_ONLY    1: stop after the build (no GPU needed: the bare-machine reproduction)
#   TROPD_GPU_LOG_COPY      a folder the logs are copied to at exit (e.g. the device tool's $OUT)
# Exit status: non-zero if the configure, the build, any GPU test or a sanitizer check failed
# (a sanitizer run cut by its time limit, and benchmark problems, are reported, not fatal).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

BUILD=${TROPD_GPU_BUILD_DIR:-build/gpu-check}
DEPS=${TROPD_GPU_DEPS_DIR:-build/gpu-deps}
JOBS=${TROPD_JOBS:-$(nproc 2>/dev/null || echo 4)}
REPS=${TROPD_BENCH_REPS:-5}
BUDGET=${TROPD_GPU_CHECK_BUDGET:-540}
SANITIZERS=${TROPD_GPU_SANITIZERS-memcheck racecheck synccheck}
SAN_MAX_V=${TROPD_GPU_SANITIZE_MAX_V:-5003}
WERROR=${TROPD_GPU_WERROR:-OFF}
NATIVE=${TROPD_GPU_MARCH_NATIVE:-ON}
BUILD_ONLY=${TROPD_GPU_BUILD_ONLY:-0}
LOG_DIR=$BUILD/gpu-check-logs
start=$SECONDS

stamp() { printf '[gpu_check %4ds %s] %s\n' $((SECONDS - start)) "$(date -u +%H:%M:%S)" "$*"; }
left() { echo $((BUDGET - (SECONDS - start))); }
results=()
note() { results+=("$*"); }

mkdir -p "$LOG_DIR"
copy_logs() {
  if [[ -n ${TROPD_GPU_LOG_COPY:-} ]]; then
    mkdir -p "$TROPD_GPU_LOG_COPY" && cp -R "$LOG_DIR/." "$TROPD_GPU_LOG_COPY/" 2>/dev/null
  fi
}
trap copy_logs EXIT

find_nvcc() {
  if [[ -n ${CUDACXX:-} && -x ${CUDACXX} ]]; then echo "$CUDACXX"
  elif command -v nvcc >/dev/null 2>&1; then command -v nvcc
  elif [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  else return 1
  fi
}

# ---- 0. facts --------------------------------------------------------------------------------
have_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then have_gpu=1; fi
if [[ $have_gpu -eq 0 && $BUILD_ONLY != 1 ]]; then
  echo "gpu_check.sh: no GPU visible (nvidia-smi failed); this script is for a machine with a GPU." >&2
  echo "  Without a GPU: TROPD_GPU_BUILD_ONLY=1 TROPD_CUDA_ARCH=90 bash scripts/gpu_check.sh (configure + build" >&2
  echo "  as on a bare GPU machine), or scripts/test.sh (stage cuda)." >&2
  exit 2
fi
if ! NVCC=$(find_nvcc); then
  echo "gpu_check.sh: nvcc not found (not CUDACXX, not on PATH, not under \$CUDA_HOME or /usr/local/cuda)" >&2
  exit 1
fi
SAN=$(command -v compute-sanitizer 2>/dev/null || true)
[[ -z $SAN && -x $(dirname "$NVCC")/compute-sanitizer ]] && SAN=$(dirname "$NVCC")/compute-sanitizer
if [[ -z $SAN ]]; then  # packed by TROPD_PACK_SANITIZER=1 scripts/pack_gpu_deps.sh and carried
  for s in "${TROPD_GPU_SANITIZER_DIR:-build/gpu-sanitizer}"/nvidia/*/bin/compute-sanitizer; do
    [[ -x $s ]] && SAN=$s
  done
fi
stamp "facts"
{
  if [[ $have_gpu -eq 1 ]]; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
      --format=csv 2>/dev/null
  fi
  echo "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*' | head -n 1))"
  echo "host compiler: $(${CXX:-c++} --version 2>/dev/null | head -n 1)"
  echo "cmake: $(cmake --version | head -n 1); ninja: $(ninja --version 2>/dev/null || echo none); cores: $(nproc 2>/dev/null)"
  echo "compute-sanitizer: ${SAN:-none (carry build/gpu-sanitizer: TROPD_PACK_SANITIZER=1 scripts/pack_gpu_deps.sh)}"
} 2>&1 | tee "$LOG_DIR/facts.log"

ARCH=${TROPD_CUDA_ARCH:-}
if [[ -z $ARCH ]]; then
  cap=""
  [[ $have_gpu -eq 1 ]] && cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  if [[ $cap =~ ^[0-9]+$ ]]; then ARCH=$cap; elif [[ $have_gpu -eq 1 ]]; then ARCH=native; else ARCH=90; fi
fi
GEN=Ninja
command -v ninja >/dev/null 2>&1 || GEN="Unix Makefiles"

# ---- 1. dependency prefix ---------------------------------------------------------------------
deps_args=()
if bash scripts/pack_gpu_deps.sh >"$LOG_DIR/pack.log" 2>&1; then
  stamp "dependency prefix: $(tail -n 1 "$LOG_DIR/pack.log" | sed 's/^pack_gpu_deps.sh: //')"
elif [[ -f $DEPS/STAMP ]]; then
  stamp "dependency prefix: the carried $DEPS ($(cat "$DEPS/STAMP"))"
else
  stamp "dependency prefix: none (no Debian packages here and $DEPS was not carried); using the system's packages"
  sed 's/^/  /' "$LOG_DIR/pack.log"
fi
BARE=${TROPD_GPU_BARE:-}
if [[ -f $DEPS/STAMP ]]; then
  deps_args+=("-DCMAKE_PREFIX_PATH=$(cd "$DEPS" && pwd)")
  [[ -z $BARE ]] && BARE=1
fi
if [[ ${BARE:-0} == 1 ]]; then
  # Only the prefix (and the CUDA toolkit, found from nvcc) can satisfy find_package: the same
  # configure as on a bare GPU machine, wherever this runs. With PATH hidden from CMake's
  # searches, the build tool and the host compiler are named explicitly.
  deps_args+=(-DCMAKE_FIND_USE_CMAKE_SYSTEM_PATH=OFF -DCMAKE_FIND_USE_SYSTEM_ENVIRONMENT_PATH=OFF)
  make_prog=$(command -v "$([[ $GEN == Ninja ]] && echo ninja || echo make)" || true)
  [[ -n $make_prog ]] && deps_args+=("-DCMAKE_MAKE_PROGRAM=$make_prog")
  cxx=$(command -v "${CXX:-c++}" || command -v g++ || true)
  [[ -n $cxx ]] && deps_args+=("-DCMAKE_CXX_COMPILER=$cxx")
fi

# ---- 2. configure -----------------------------------------------------------------------------
stamp "configure $BUILD (CUDA architectures $ARCH, $GEN, bare=${BARE:-0}, -Werror $WERROR, -march=native $NATIVE)"
# -U...: find the dependencies again at every run (a cached *_DIR would hide a missing prefix).
if ! CUDACXX=$NVCC cmake -S . -B "$BUILD" -G "$GEN" -DCMAKE_BUILD_TYPE=Release -DTROPD_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DTROPD_BUILD_EXAMPLES=OFF -DTROPD_INSTALL=OFF \
    -DTROPD_WARNINGS_AS_ERRORS="$WERROR" -DTROPD_MARCH_NATIVE="$NATIVE" \
    -UEigen3_DIR -Udoctest_DIR -Ubenchmark_DIR "${deps_args[@]}" >"$LOG_DIR/configure.log" 2>&1; then
  tail -n 30 "$LOG_DIR/configure.log"
  echo "gpu_check.sh: configure failed. It needs nvcc, CMake >= 3.25, Eigen 3.4 and doctest: on a bare" >&2
  echo "  machine, run scripts/pack_gpu_deps.sh where the Debian packages are and carry $DEPS." >&2
  exit 1
fi
grep -E '^-- (tropd|The CUDA compiler identification|The CXX compiler identification)' "$LOG_DIR/configure.log" | sed 's/^/  /'

# ---- 3. build -----------------------------------------------------------------------------------
stamp "build tropd-cuda-all (-j $JOBS)"
build_start=$SECONDS
if ! cmake --build "$BUILD" -j "$JOBS" --target tropd-cuda-all >"$LOG_DIR/build.log" 2>&1; then
  grep -E 'error|Error' "$LOG_DIR/build.log" | head -n 40
  echo "gpu_check.sh: build failed, see $LOG_DIR/build.log" >&2
  exit 1
fi
warnings=$(grep -cE 'warning[: #]' "$LOG_DIR/build.log")
stamp "built in $((SECONDS - build_start)) s; $warnings warning line(s) in the build log"
[[ $warnings -gt 0 ]] && grep -E 'warning[: #]' "$LOG_DIR/build.log" | sort | uniq -c | sort -rn | head -n 10
note "build: ok ($((SECONDS - build_start)) s, $warnings warning lines)"
if [[ $BUILD_ONLY == 1 ]]; then
  stamp "done (TROPD_GPU_BUILD_ONLY=1: configure and build only)"
  exit 0
fi

# ---- 4. GPU tests -------------------------------------------------------------------------------
stamp "ctest -L gpu"
(cd "$BUILD" && ctest -L gpu --output-on-failure) 2>&1 | tee "$LOG_DIR/ctest.log"
test_rc=${PIPESTATUS[0]}
if grep -qE '\(Skipped\)' "$LOG_DIR/ctest.log"; then
  echo "gpu_check.sh: WARNING: the GPU tests were skipped (the test binary saw no CUDA device)" >&2
  test_rc=1
fi
note "tests: $([[ $test_rc -eq 0 ]] && echo passed || echo FAILED) ($(grep -oE '[0-9.]+ sec' "$LOG_DIR/ctest.log" | tail -n 1))"

# ---- 5. benchmark -------------------------------------------------------------------------------
bench_gpu=$BUILD/bin/tropd-bench-gpu
t=$(( $(left) - 60 ))  # leave a minute for the sanitizers
[[ $t -gt 240 ]] && t=240
if [[ ! -x $bench_gpu ]]; then
  stamp "tropd-bench-gpu was not built"
  note "benchmark: not built"
elif [[ $t -lt 30 ]]; then
  stamp "tropd-bench-gpu skipped: $(left) s of the budget left"
  note "benchmark: skipped (budget)"
else
  stamp "tropd-bench-gpu --reps $REPS (time limit ${t}s)"
  timeout "$t" "$bench_gpu" --reps "$REPS" 2>&1 | tee "$LOG_DIR/bench-gpu.log"
  rc=${PIPESTATUS[0]}
  note "benchmark: $([[ $rc -eq 0 ]] && echo ok || echo "exit $rc$([[ $rc -eq 124 ]] && echo ' (time limit)')")"
fi

# ---- 6. compute-sanitizer on small cases ---------------------------------------------------------
san_rc=0
tests_bin=$BUILD/bin/tropd-gpu-tests
for tool in $SANITIZERS; do
  t=$(( $(left) - 10 ))
  [[ $t -gt 180 ]] && t=180
  if [[ -z $SAN ]]; then
    stamp "compute-sanitizer not found: $tool skipped"; note "$tool: skipped (no compute-sanitizer)"; continue
  elif [[ $t -lt 30 ]]; then
    stamp "compute-sanitizer $tool skipped: $(left) s of the budget left"; note "$tool: skipped (budget)"; continue
  fi
  stamp "compute-sanitizer --tool $tool tropd-gpu-tests, V capped at $SAN_MAX_V (time limit ${t}s)"
  log=$LOG_DIR/sanitizer-$tool.log
  TROPD_GPU_TEST_MAX_V=$SAN_MAX_V timeout "$t" "$SAN" --tool "$tool" --error-exitcode 99 \
    "$tests_bin" >"$log" 2>&1
  rc=$?
  summary=$(grep -E '(ERROR SUMMARY|RACECHECK SUMMARY|SYNCCHECK SUMMARY|test cases:)' "$log" | tr -s ' ' | paste -sd ';' -)
  if [[ $rc -eq 0 ]]; then
    note "$tool: clean ($summary)"
  elif [[ $rc -eq 124 ]]; then
    note "$tool: cut at its ${t} s limit, not failed ($summary)"
  else
    san_rc=1
    note "$tool: FAILED, exit $rc ($summary; $log)"
    grep -E '^=========' "$log" | head -n 30
  fi
done

# ---- 7. table and summary -------------------------------------------------------------------------
echo
gpu_name=$( [[ $have_gpu -eq 1 ]] && nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "==== tropd GPU kernels vs a device-to-device cudaMemcpy of the same bytes ($gpu_name) ===="
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
echo
echo "==== gpu_check summary ($((SECONDS - start)) s of a ${BUDGET} s budget) ===="
for r in "${results[@]}"; do echo "  $r"; done
rc=0
[[ $test_rc -ne 0 || $san_rc -ne 0 ]] && rc=1
stamp "done: $([[ $rc -eq 0 ]] && echo passed || echo FAILED)"
exit "$rc"
