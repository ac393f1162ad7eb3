#!/usr/bin/env bash
# tropd's demo (the README's main command): installs what is missing, configures
# and builds build/release, then runs tropd-demo (examples/demo/) if it exists,
# otherwise tropd-example-estimators (examples/estimators.cpp). Arguments are
# passed through to the program.
#
# tropd-demo runs OPD, EOPD, REOPOLD, TrOPD, TrOPD's ablations and standalone top-k
# FKL on a synthetic multi-step arithmetic task in the paper's regime (36-token
# responses, V = 256, harmless and harmful outliers; 8 methods x 5 seeds, each
# method at its own learning rate tuned on a separate setup; about 4-5 minutes of
# CPU, 2-3 minutes on 2 idle cores after a ~40 s build) and writes
# out/demo/{summary.csv,curves.csv,curves.png,...}; the plot is drawn with gnuplot,
# which scripts/setup.sh installs (gnuplot-nox). `bash scripts/demo.sh --help`
# lists its flags; docs/results.md discusses a default run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

build=build/release
# Quiet when all goes well; the full output when something fails.
quietly() {
  local out
  if ! out=$("$@" 2>&1); then
    echo "$out" >&2
    echo "demo.sh: failed: $*" >&2
    exit 1
  fi
}

quietly cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release

targets=$(ninja -C "$build" -t targets all)
has_target() { grep -q "^$1: phony" <<<"$targets"; }

program=""
for candidate in tropd-demo tropd-example-estimators; do
  if has_target "$candidate"; then
    program=$candidate
    break
  fi
done
if [[ -z $program ]]; then
  echo "demo.sh: neither tropd-demo (examples/demo/*.cpp) nor tropd-example-estimators" \
       "(examples/estimators.cpp) exists yet" >&2
  exit 1
fi

quietly cmake --build "$build" -j "${TROPD_JOBS:-2}" --target "$program"
exec "$build/bin/$program" "$@"
