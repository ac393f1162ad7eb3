#!/usr/bin/env bash
# scripts/pack_gpu_deps.sh: packs the header-only dependencies a bare GPU machine lacks into
# build/gpu-deps, a small relocatable CMake prefix that travels with the working tree.
#
# The lent GPU machines have nvcc, CMake, ninja and Python but no Eigen, no doctest, no Google
# Benchmark and no network. tropd needs Eigen (the library's host code, which the GPU tests
# compare against) and doctest (the test runner); both are header-only. This script copies them
# from THIS machine's Debian packages (scripts/setup.sh installs libeigen3-dev and doctest-dev):
#
#   build/gpu-deps/include/eigen3/Eigen/...        Eigen's headers (not unsupported/, not docs)
#   build/gpu-deps/share/eigen3/cmake/*.cmake      Debian's Eigen3 package config (relocatable as is)
#   build/gpu-deps/include/doctest/doctest.h       the single doctest header
#   build/gpu-deps/lib/cmake/doctest/*.cmake       a relocatable doctestConfig.cmake written here
#                                                  (Debian's hard-codes the /usr prefix)
#   build/gpu-deps/STAMP                           versions, to make reruns a no-op
#
# Google Benchmark is NOT packed (a compiled library; the GPU benchmark has its own main):
# CMake uses it where it is installed and skips the benchmarks that need it elsewhere.
#
# compute-sanitizer, which this image's CUDA toolkit lacks (and a GPU machine's may too), is
# packed on request into a second folder, build/gpu-sanitizer (about 40 MB, from PyPI's
# nvidia-cuda-sanitizer-api for the toolkit's major.minor version): TROPD_PACK_SANITIZER=1.
# scripts/gpu_check.sh uses it when the toolkit there has none.
#
# Use: bash scripts/pack_gpu_deps.sh, then configure with
#   -DCMAKE_PREFIX_PATH="$PWD/build/gpu-deps"
# (scripts/gpu_check.sh does so whenever the folder exists). On the device, carry
# "build/gpu-deps" (about 7 MB) and, if packed, "build/gpu-sanitizer" (about 40 MB; the
# working tree and the carried folders may take 64 MiB in all). build/ is git-ignored.
#
# Environment: TROPD_GPU_DEPS_DIR (default build/gpu-deps), TROPD_PACK_SANITIZER (1: also
# build/gpu-sanitizer, or TROPD_GPU_SANITIZER_DIR), EIGEN3_CMAKE_DIR (the folder of
# Eigen3Config.cmake), DOCTEST_INCLUDE_DIR (the folder holding doctest/doctest.h).
# Idempotent: when the STAMP matches, nothing is copied. Exit status non-zero if a
# dependency is missing here.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${TROPD_GPU_DEPS_DIR:-build/gpu-deps}

die() {
  echo "pack_gpu_deps.sh: $*" >&2
  exit 1
}

# ---- compute-sanitizer (optional) ------------------------------------------------------------
if [[ ${TROPD_PACK_SANITIZER:-0} == 1 ]]; then
  san_out=${TROPD_GPU_SANITIZER_DIR:-build/gpu-sanitizer}
  nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  cuda_ver=$("$nvcc" --version 2>/dev/null | grep -oE 'release [0-9]+\.[0-9]+' | awk '{ print $2 }')
  [[ -n $cuda_ver ]] || die "TROPD_PACK_SANITIZER=1: nvcc not found (the sanitizer is packed for its version)"
  if [[ -f $san_out/STAMP && "$(cat "$san_out/STAMP")" == "nvidia-cuda-sanitizer-api $cuda_ver" ]]; then
    echo "pack_gpu_deps.sh: $san_out is up to date (compute-sanitizer for CUDA $cuda_ver)"
  else
    rm -rf "$san_out.tmp"
    python3 -m pip install -q --disable-pip-version-check --no-deps --target "$san_out.tmp" \
      "nvidia-cuda-sanitizer-api==$cuda_ver.*" || die "pip could not install nvidia-cuda-sanitizer-api==$cuda_ver.*"
    ls "$san_out.tmp"/nvidia/*/bin/compute-sanitizer >/dev/null 2>&1 ||
      die "nvidia-cuda-sanitizer-api has no nvidia/*/bin/compute-sanitizer"
    rm -rf "$san_out.tmp"/nvidia/*/include "$san_out.tmp"/bin  # headers and pip's entry scripts are not needed
    echo "nvidia-cuda-sanitizer-api $cuda_ver" >"$san_out.tmp/STAMP"
    rm -rf "$san_out"
    mv "$san_out.tmp" "$san_out"
    echo "pack_gpu_deps.sh: packed $san_out (compute-sanitizer for CUDA $cuda_ver, $(du -sh "$san_out" | cut -f1))"
  fi
fi

# ---- locate Eigen (its package config computes the include dir as <prefix>/include/eigen3) --
eigen_cmake=""
for d in ${EIGEN3_CMAKE_DIR:-} /usr/share/eigen3/cmake /usr/local/share/eigen3/cmake \
         /usr/lib/cmake/eigen3 /usr/local/lib/cmake/eigen3; do
  if [[ -f $d/Eigen3Config.cmake && -f $d/Eigen3Targets.cmake ]]; then
    eigen_cmake=$d
    break
  fi
done
[[ -n $eigen_cmake ]] || die "Eigen3Config.cmake not found (install libeigen3-dev: scripts/setup.sh, or set EIGEN3_CMAKE_DIR)"
# Debian's Eigen3Targets.cmake goes up three levels from its own folder to the prefix.
eigen_prefix=$(cd "$eigen_cmake/../../.." && pwd)
eigen_inc=$eigen_prefix/include/eigen3
[[ -f $eigen_inc/Eigen/Core ]] || die "Eigen headers not found next to $eigen_cmake (expected <prefix>/include/eigen3/Eigen/Core)"
grep -q '_IMPORT_PREFIX}/include/eigen3' "$eigen_cmake/Eigen3Targets.cmake" ||
  die "$eigen_cmake/Eigen3Targets.cmake does not use a relocatable <prefix>/include/eigen3: cannot pack it as is"
eigen_version=$(awk '/#define EIGEN_(WORLD|MAJOR|MINOR)_VERSION/ { v = v (v == "" ? "" : ".") $3 } END { print v }' \
  "$eigen_inc/Eigen/src/Core/util/Macros.h")

# ---- locate doctest ---------------------------------------------------------------------------
doctest_inc=""
for d in ${DOCTEST_INCLUDE_DIR:-} /usr/include /usr/local/include; do
  if [[ -f $d/doctest/doctest.h ]]; then
    doctest_inc=$d
    break
  fi
done
[[ -n $doctest_inc ]] || die "doctest/doctest.h not found (install doctest-dev: scripts/setup.sh, or set DOCTEST_INCLUDE_DIR)"
doctest_version=$(awk '/#define DOCTEST_VERSION_(MAJOR|MINOR|PATCH) / { v = v (v == "" ? "" : ".") $3 } END { print v }' \
  "$doctest_inc/doctest/doctest.h")
[[ $doctest_version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "cannot read doctest's version from doctest.h"

script_sum=$(cksum <"$0" | awk '{ print $1 }')
stamp="eigen $eigen_version; doctest $doctest_version; packer $script_sum"
if [[ -f $OUT/STAMP && "$(cat "$OUT/STAMP")" == "$stamp" && -f $OUT/include/eigen3/Eigen/Core &&
      -f $OUT/include/doctest/doctest.h && -f $OUT/lib/cmake/doctest/doctestConfig.cmake ]]; then
  echo "pack_gpu_deps.sh: $OUT is up to date ($stamp)"
  exit 0
fi

# ---- pack into a temporary folder, then swap it in (an interrupted run leaves no half prefix) --
tmp=$OUT.tmp.$$
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/include/eigen3" "$tmp/share/eigen3/cmake" "$tmp/include/doctest" "$tmp/lib/cmake/doctest"

cp -Rp "$eigen_inc/Eigen" "$tmp/include/eigen3/"
[[ -f $eigen_inc/signature_of_eigen3_matrix_library ]] && cp "$eigen_inc/signature_of_eigen3_matrix_library" "$tmp/include/eigen3/"
for f in Eigen3Config.cmake Eigen3ConfigVersion.cmake Eigen3Targets.cmake; do
  cp "$eigen_cmake/$f" "$tmp/share/eigen3/cmake/"
done
# Eigen3Targets-*.cmake (per-configuration files) are globbed by Eigen3Targets.cmake: none for an
# interface target, but copy any that exist.
for f in "$eigen_cmake"/Eigen3Targets-*.cmake; do
  [[ -f $f ]] && cp "$f" "$tmp/share/eigen3/cmake/"
done

cp -p "$doctest_inc/doctest/doctest.h" "$tmp/include/doctest/"
cat >"$tmp/lib/cmake/doctest/doctestConfig.cmake" <<'EOF'
# doctest (header only), packed by tropd's scripts/pack_gpu_deps.sh. Relocatable: the prefix
# is three levels above this file (<prefix>/lib/cmake/doctest), wherever it was copied to.
get_filename_component(_tropd_doctest_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET doctest::doctest)
  add_library(doctest::doctest INTERFACE IMPORTED)
  set_target_properties(doctest::doctest PROPERTIES
    INTERFACE_COMPILE_FEATURES "cxx_std_11"
    INTERFACE_INCLUDE_DIRECTORIES "${_tropd_doctest_prefix}/include")
endif()
unset(_tropd_doctest_prefix)
EOF
cat >"$tmp/lib/cmake/doctest/doctestConfigVersion.cmake" <<EOF
# doctest $doctest_version, packed by tropd's scripts/pack_gpu_deps.sh: any requested version
# with the same major number and not newer is compatible (SameMajorVersion).
set(PACKAGE_VERSION "$doctest_version")
if(PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
elseif(NOT PACKAGE_FIND_VERSION_MAJOR OR PACKAGE_FIND_VERSION_MAJOR STREQUAL "${doctest_version%%.*}")
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
else()
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
endif()
EOF
echo "$stamp" >"$tmp/STAMP"

rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
mv "$tmp" "$OUT"
trap - EXIT
echo "pack_gpu_deps.sh: packed $OUT ($stamp, $(du -sh "$OUT" | cut -f1))"
