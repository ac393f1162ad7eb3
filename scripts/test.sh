#!/usr/bin/env bash
# tropd's test command (the README's; .ci/run runs exactly this).
#
# Stages (TROPD_TEST_STAGES, default "release asan tsan fuzz cuda python dist"):
#   release  g++ Release build of everything in build/release; ctest -LE gpu
#            (unit, compile_fail, install tests)
#   asan     clang++ with TROPD_SANITIZE=address,undefined in build/asan;
#            runs tropd-tests only (ctest -L unit)
#   cuda     TROPD_ENABLE_CUDA=ON in build/cuda (needs nvcc), configured as on a bare
#            GPU machine (scripts/pack_gpu_deps.sh's prefix, system package paths
#            hidden): builds every CUDA target (tropd-cuda-all: each .cu for sm_80
#            and sm_90) and each public .cuh compiled alone (tropd-header-check-cuda),
#            then ctest -L gpu, which is skipped (exit 77) without a GPU
#   tsan     clang++ with TROPD_SANITIZE=thread in build/tsan; builds only
#            tropd-concurrency-tests (tests/host/test_concurrency.cpp) and runs it
#            (ctest -L concurrency, doctest filter -tc='*concurrency*')
#   fuzz     clang++ libFuzzer + ASan + UBSan build of fuzz/ in build/fuzz; runs each
#            target (rows, topk, objective) for TROPD_FUZZ_SECONDS (default 60) seeded
#            with fuzz/corpus/<target>; a crash or an oracle failure fails the stage.
#            Known open issues (docs/robustness.md) are reported, not failed
#            (TROPD_FUZZ_IGNORE_KNOWN=1): the corpus replay in tropd-tests covers them.
#   python   the Python package: installs what it needs once (torch from PyPI, a large
#            download the first time; numpy, pytest, nanobind, scikit-build-core; quiet when
#            present; the download starts in the background when the run starts), `pip install --no-build-isolation .` (the extension is built in
#            build/python/<wheel tag>, kept between runs, so a rerun rebuilds only what
#            changed), then pytest python/tests (each test counts in the summary; CUDA tests
#            are skipped without a GPU). When nvcc is found it also compiles the extension's
#            CUDA dispatch (python/src/gpu*.cu) in build/python-cuda (one more "passed").
#            TROPD_PYTHON (default python3) picks the interpreter.
#   dist     TROPD_BUILD_DIST_TESTS=ON in build/dist: builds only the distributed tests
#            (tests/dist) and runs ctest -L dist: tropd-mpi-tests under mpiexec -np 1, 2, 3
#            and 4 (Open MPI: --allow-run-as-root --oversubscribe), two torch.distributed gloo
#            processes (skipped without torch), and the NCCL adapter built with nvcc (its
#            one-GPU run is skipped without a GPU)
#
# Ends with the line "N passed, N failed" (CTest results of all stages; a failed
# configure or build counts as one failure) and exits non-zero on any failure.
# TROPD_JOBS sets the parallelism (default 2).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

JOBS=${TROPD_JOBS:-2}
STAGES=${TROPD_TEST_STAGES:-release asan tsan fuzz cuda python dist}
LOG_DIR=build/test-logs

total_passed=0
total_failed=0
total_skipped=0
failures=()
timings=()
notes=()

mkdir -p "$LOG_DIR"

note_failure() { # what
  total_failed=$((total_failed + 1))
  failures+=("$1")
  echo "!!! FAILED: $1" >&2
}

# configure_build STAGE BUILD_DIR "TARGETS" CMAKE_ARGS...  (TARGETS empty: all)
configure_build() {
  local stage=$1 dir=$2 targets=$3
  shift 3
  if ! cmake -S . -B "$dir" -G Ninja "$@"; then
    note_failure "$stage: configure"
    return 1
  fi
  local target_args=()
  if [[ -n $targets ]]; then
    # shellcheck disable=SC2206  # word splitting is intended
    target_args=(--target $targets)
  fi
  if ! cmake --build "$dir" -j "$JOBS" "${target_args[@]}"; then
    note_failure "$stage: build"
    return 1
  fi
}

# run_ctest STAGE BUILD_DIR CTEST_ARGS...: runs ctest, adds its counts to the totals.
run_ctest() {
  local stage=$1 dir=$2
  shift 2
  local log="$LOG_DIR/$stage-ctest.log"
  (cd "$dir" && ctest --output-on-failure --no-tests=error -j "$JOBS" "$@") 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local line
  line=$(grep -E '[0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1)
  if [[ $line =~ ([0-9]+)\ tests?\ failed\ out\ of\ ([0-9]+) ]]; then
    local failed=${BASH_REMATCH[1]} total=${BASH_REMATCH[2]}
    local skipped
    skipped=$(grep -cE '^[[:space:]]+[0-9]+ - .+ \((Skipped|Disabled)\)$' "$log")
    total_passed=$((total_passed + total - failed - skipped))
    total_skipped=$((total_skipped + skipped))
    total_failed=$((total_failed + failed))
    [[ $failed -gt 0 ]] && failures+=("$stage: $failed CTest test(s), see $log")
    if [[ $rc -ne 0 && $failed -eq 0 ]]; then
      note_failure "$stage: ctest exited with $rc"
    fi
  else
    note_failure "$stage: ctest produced no result line (exit $rc), see $log"
  fi
}

find_nvcc() {
  if command -v nvcc >/dev/null 2>&1; then
    command -v nvcc
  elif [[ -n ${CUDACXX:-} && -x ${CUDACXX} ]]; then
    echo "$CUDACXX"
  elif [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then
    echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  else
    return 1
  fi
}

# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------
stage_release() {
  configure_build release build/release "" -DCMAKE_BUILD_TYPE=Release || return
  run_ctest release build/release -LE gpu
}

stage_asan() {
  export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:strict_init_order=1:check_initialization_order=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1}
  configure_build asan build/asan tropd-tests \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ \
    -DTROPD_SANITIZE=address,undefined \
    -DTROPD_BUILD_BENCHMARKS=OFF -DTROPD_BUILD_EXAMPLES=OFF || return
  run_ctest asan build/asan -L unit
}

stage_cuda() {
  local nvcc
  if ! nvcc=$(find_nvcc); then
    local msg="WARNING: nvcc not found (not on PATH, CUDACXX or CUDA_HOME): the CUDA stage did NOT run; no .cu file was compiled"
    echo "$msg" >&2
    notes+=("$msg")
    return
  fi
  # Configured as on a bare GPU machine (docs/gpu.md): Eigen and doctest only from the packed
  # prefix build/gpu-deps (scripts/pack_gpu_deps.sh, what the device run carries), the system
  # package paths hidden, the dependencies found again at every run (-U...), the tools named
  # explicitly (CMake no longer searches PATH). So every run proves the bare configure at no
  # extra build cost. Warnings stay errors here: this is the compiler CI is written for.
  # CUDACXX only matters for the first configure of build/cuda (then it is cached).
  if ! bash scripts/pack_gpu_deps.sh; then
    note_failure "cuda: scripts/pack_gpu_deps.sh"
    return
  fi
  CUDACXX=$nvcc configure_build cuda build/cuda "tropd-cuda-all tropd-header-check-cuda" \
    -DCMAKE_BUILD_TYPE=Release -DTROPD_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="80;90" \
    -DTROPD_BUILD_EXAMPLES=OFF \
    -DCMAKE_PREFIX_PATH="$PWD/build/gpu-deps" -UEigen3_DIR -Udoctest_DIR -Ubenchmark_DIR \
    -DCMAKE_FIND_USE_CMAKE_SYSTEM_PATH=OFF -DCMAKE_FIND_USE_SYSTEM_ENVIRONMENT_PATH=OFF \
    -DCMAKE_MAKE_PROGRAM="$(command -v ninja)" -DCMAKE_CXX_COMPILER="$(command -v "${CXX:-c++}")" || return
  run_ctest cuda build/cuda -L gpu
  if grep -qE 'tropd-gpu-tests \(Skipped\)' "$LOG_DIR/cuda-ctest.log"; then
    notes+=("cuda: every .cu compiled, but the GPU tests were NOT executed (no CUDA device here)")
  fi
}

stage_tsan() {
  export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}
  # Only the concurrency cases (tests/host/test_concurrency.cpp): a small executable of their own.
  configure_build tsan build/tsan tropd-concurrency-tests \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ \
    -DTROPD_SANITIZE=thread -DTROPD_INSTALL=OFF \
    -DTROPD_BUILD_BENCHMARKS=OFF -DTROPD_BUILD_EXAMPLES=OFF || return
  run_ctest tsan build/tsan -L concurrency
}

stage_fuzz() {
  if ! command -v clang++ >/dev/null 2>&1; then
    note_failure "fuzz: clang++ not found (libFuzzer needs clang)"
    return
  fi
  configure_build fuzz build/fuzz tropd-fuzzers \
    -DCMAKE_CXX_COMPILER=clang++ -DTROPD_BUILD_FUZZERS=ON -DTROPD_INSTALL=OFF \
    -DTROPD_BUILD_BENCHMARKS=OFF -DTROPD_BUILD_EXAMPLES=OFF || return
  local secs=${TROPD_FUZZ_SECONDS:-60} t
  mkdir -p build/fuzz/artifacts
  # Each target runs single-threaded for `secs`: two at a time keep both cores busy
  # (rows and topk together, then objective), so the stage fuzzes 3 x secs in 2 x secs.
  run_target() { # target
    local t=$1 work=build/fuzz/corpus-work/$1 log="$LOG_DIR/fuzz-$1.log"
    mkdir -p "$work"
    # New inputs go to build/fuzz/corpus-work/<t>; the repository corpus only seeds.
    TROPD_FUZZ_IGNORE_KNOWN=1 \
      ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=1:detect_leaks=1} \
      UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1} \
      "build/fuzz/bin/tropd-fuzz-$t" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="build/fuzz/artifacts/$t-" "$work" "fuzz/corpus/$t" >"$log" 2>&1
  }
  declare -A rc=()
  echo "fuzz: rows and topk for ${secs} s each (in parallel), then objective"
  run_target rows & local p_rows=$!
  run_target topk & local p_topk=$!
  wait "$p_rows"; rc[rows]=$?
  run_target objective & local p_obj=$!
  wait "$p_topk"; rc[topk]=$?
  wait "$p_obj"; rc[objective]=$?
  for t in rows topk objective; do
    local log="$LOG_DIR/fuzz-$t.log"
    if [[ ${rc[$t]} -eq 0 ]]; then
      total_passed=$((total_passed + 1))
      grep -E '^stat::number_of_executed_units' "$log" | sed "s/^/  $t: /"
    else
      tail -n 40 "$log" >&2
      note_failure "fuzz: target $t failed (see $log; the input is under build/fuzz/artifacts/)"
    fi
    local known
    known=$(grep -oE 'known issue [A-Z][0-9A-Z]* reproduces' "$log" | awk '{print $3}' | sort -u | tr '\n' ' ')
    [[ -n $known ]] && notes+=("fuzz $t: open known issues still reproduce: ${known% }")
  done
}

stage_dist() {
  # Only the distributed targets: the MPI executable and the torch.distributed shim, then,
  # where nvcc and NCCL are found, the NCCL adapter check (CUDA is enabled for it alone).
  local nvcc cuda_args=()
  if nvcc=$(find_nvcc); then
    cuda_args=(-DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="80;90")
  fi
  configure_build dist build/dist "tropd-mpi-tests tropd-dist-shim" \
    -DCMAKE_BUILD_TYPE=Release -DTROPD_BUILD_DIST_TESTS=ON -DTROPD_INSTALL=OFF \
    -DTROPD_BUILD_BENCHMARKS=OFF -DTROPD_BUILD_EXAMPLES=OFF "${cuda_args[@]}" || return
  if cmake --build build/dist --target help | grep -q 'tropd-nccl-check'; then
    if ! cmake --build build/dist -j "$JOBS" --target tropd-nccl-check; then
      note_failure "dist: build tropd-nccl-check"
      return
    fi
  else
    notes+=("dist: the NCCL adapter check was not built (nvcc or NCCL not found)")
  fi
  run_ctest dist build/dist -L dist
  if grep -qE 'tropd-torch-gloo \(Skipped\)' "$LOG_DIR/dist-ctest.log"; then
    notes+=("dist: torch.distributed test skipped (torch with gloo not importable)")
  fi
  if grep -qE 'tropd-nccl-check \(Skipped\)' "$LOG_DIR/dist-ctest.log"; then
    notes+=("dist: the NCCL adapter compiled and linked, its one-GPU run was skipped (no CUDA device here)")
  fi
}

# Installs the Python packages the python stage needs, each only if it is missing.
python_deps() { # python
  local py=$1 missing=() pkg mod
  for pkg in "torch>=2.4:torch" "numpy:numpy" "pytest:pytest" "nanobind>=2.0:nanobind" "scikit-build-core>=0.10:scikit_build_core"; do
    mod=${pkg##*:}
    "$py" -c "import $mod" >/dev/null 2>&1 || missing+=("${pkg%:*}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ " ${missing[*]} " == *" torch>=2.4 "* ]]; then
    echo "python: installing torch from PyPI (about 4 GB with its CUDA libraries; once: later runs find it)"
  fi
  echo "python: pip install ${missing[*]}"
  "$py" -m pip install -q "${missing[@]}"
}

# The download of the Python dependencies (torch: a few GB on a fresh machine) runs in the
# background from the start of the run, while the C++ stages compile; stage_python waits for it.
python_deps_pid=
python_deps_log=$LOG_DIR/python-deps.log
start_python_deps() {
  local py=${TROPD_PYTHON:-python3}
  command -v "$py" >/dev/null 2>&1 || return 0
  python_deps "$py" >"$python_deps_log" 2>&1 &
  python_deps_pid=$!
}

stage_python() {
  local py=${TROPD_PYTHON:-python3}
  if ! command -v "$py" >/dev/null 2>&1; then
    note_failure "python: interpreter '$py' not found"
    return
  fi
  local deps_ok=1
  if [[ -n $python_deps_pid ]]; then
    wait "$python_deps_pid" || deps_ok=0
    cat "$python_deps_log"
  else
    python_deps "$py" || deps_ok=0
  fi
  if [[ $deps_ok -ne 1 ]]; then
    note_failure "python: installing the Python dependencies"
    return
  fi
  local log="$LOG_DIR/python-install.log"
  echo "python: pip install --no-build-isolation . (log: $log)"
  if ! CMAKE_BUILD_PARALLEL_LEVEL=$JOBS "$py" -m pip install --no-build-isolation . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    note_failure "python: pip install . (see $log)"
    return
  fi
  # The extension's CUDA dispatch, compiled by nvcc (it cannot run here without a GPU): only its
  # object files (python/src/gpu*.cu), so the stage does not build the whole extension twice.
  local nvcc
  if nvcc=$(find_nvcc); then
    local clog="$LOG_DIR/python-cuda.log"
    local cuda_objects=() cu
    for cu in python/src/gpu*.cu; do cuda_objects+=("python/CMakeFiles/_C.dir/src/$(basename "$cu").o"); done
    if cmake -S . -B build/python-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DTROPD_BUILD_PYTHON=ON \
        -DTROPD_PYTHON_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="80;90" \
        -DTROPD_BUILD_TESTS=OFF -DTROPD_BUILD_BENCHMARKS=OFF -DTROPD_BUILD_EXAMPLES=OFF -DTROPD_INSTALL=OFF \
        -DPython_EXECUTABLE="$(command -v "$py")" >"$clog" 2>&1 &&
      cmake --build build/python-cuda -j "$JOBS" --target "${cuda_objects[@]}" >>"$clog" 2>&1; then
      total_passed=$((total_passed + 1))
      echo "python: the CUDA dispatch (python/src/gpu*.cu) compiled with nvcc for sm_80 and sm_90"
    else
      tail -n 40 "$clog" >&2
      note_failure "python: the extension's CUDA dispatch does not compile (see $clog)"
    fi
  else
    notes+=("python: nvcc not found: the extension's CUDA dispatch (python/src/gpu.cu) was NOT compiled")
  fi
  local plog="$LOG_DIR/python-pytest.log"
  # From the repository root: `tropd` resolves to the installed package (python/ is not on the path).
  "$py" -m pytest python/tests -q -o cache_dir=build/pytest-cache -rs 2>&1 | tee "$plog"
  local rc=${PIPESTATUS[0]}
  local line passed=0 failed=0 errors=0 skipped=0
  line=$(grep -E '^=*[[:space:]]*[0-9]+ (passed|failed|skipped|error)' "$plog" | tail -n 1)
  [[ $line =~ ([0-9]+)\ passed ]] && passed=${BASH_REMATCH[1]}
  [[ $line =~ ([0-9]+)\ failed ]] && failed=${BASH_REMATCH[1]}
  [[ $line =~ ([0-9]+)\ errors? ]] && errors=${BASH_REMATCH[1]}
  [[ $line =~ ([0-9]+)\ skipped ]] && skipped=${BASH_REMATCH[1]}
  total_passed=$((total_passed + passed))
  total_skipped=$((total_skipped + skipped))
  total_failed=$((total_failed + failed + errors))
  [[ $((failed + errors)) -gt 0 ]] && failures+=("python: $((failed + errors)) pytest test(s), see $plog")
  if [[ -z $line ]]; then
    note_failure "python: pytest produced no result line (exit $rc), see $plog"
  elif [[ $rc -ne 0 && $((failed + errors)) -eq 0 ]]; then
    note_failure "python: pytest exited with $rc"
  fi
  if [[ $skipped -gt 0 ]] && grep -q "no CUDA device" "$plog"; then
    notes+=("python: the CUDA tests were NOT executed (no CUDA device here)")
  fi
}

# ===========================================================================
# HOOK: later stages.
# Write a function stage_<name> above (configure_build + run_ctest keep the
# summary right) and add <name> to the default of TROPD_TEST_STAGES at the top.
# ===========================================================================

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
echo "==== setup ===="
if ! bash scripts/setup.sh; then
  note_failure "setup.sh"
  echo "${total_passed} passed, ${total_failed} failed"
  exit 1
fi

[[ " $STAGES " == *" python "* ]] && start_python_deps

for stage in $STAGES; do
  if ! declare -F "stage_$stage" >/dev/null; then
    note_failure "unknown stage '$stage'"
    continue
  fi
  echo
  echo "==== stage: $stage ===="
  start=$EPOCHREALTIME
  "stage_$stage"
  end=$EPOCHREALTIME
  timings+=("$(awk -v s="$start" -v e="$end" -v n="$stage" 'BEGIN { printf "%-8s %6.1f s", n, e - s }')")
done

echo
echo "==== summary ===="
for t in "${timings[@]}"; do echo "  $t"; done
for n in "${notes[@]}"; do echo "  $n"; done
for f in "${failures[@]}"; do echo "  FAILED: $f"; done
[[ $total_skipped -gt 0 ]] && echo "  ($total_skipped test(s) skipped, counted in neither number)"
echo "${total_passed} passed, ${total_failed} failed"
[[ $total_failed -eq 0 ]]
