#!/usr/bin/env bash
# Installs the Debian packages tropd needs to build and test. Idempotent and
# quiet when everything is already there: only missing packages trigger
# `apt-get update` + `apt-get install`. Runs as root, or through sudo.
# (The CUDA toolkit is not a Debian package here: scripts/test.sh uses nvcc
# when it is on PATH, or under $CUDA_HOME, and says so when it is not.)
set -euo pipefail

packages=(
  cmake ninja-build g++ clang libclang-rt-14-dev
  libeigen3-dev doctest-dev libbenchmark-dev librandom123-dev gnuplot-nox
  openmpi-bin libopenmpi-dev
)

if ! command -v dpkg >/dev/null 2>&1; then
  echo "setup.sh: dpkg not found (not a Debian-based system); install these yourself: ${packages[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
    missing+=("$pkg")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "setup.sh: missing packages (${missing[*]}) and not root, no sudo: install them yourself" >&2
  exit 1
fi

echo "setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
