#!/usr/bin/env bash
# scripts/gpu_counts.sh: static counts of the CUDA row kernels from a CUDA build, no GPU needed
# (docs/gpu.md, "Static counts"): registers and spills, SASS instructions per element of each
# main loop (whole body and hot path), bytes read and written per element by construction, and
# a predicted fraction of the copy bandwidth. The work is done by scripts/gpu_counts.py; this
# wrapper finds the tools it needs:
#   cuobjdump, nvdisasm  on PATH, next to nvcc, or under build/cuda-tools; if absent (this
#                        image's toolkit ships neither), installed there from PyPI
#                        (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm; 6 MB, build/ is ignored);
#   ptxas                next to nvcc (the build's own, for the exact "-Xptxas -v" spill counts).
# Build first, e.g. (sm_90 only, as on a bare GPU machine, about 1.5 min on 2 cores):
#   TROPD_GPU_BUILD_ONLY=1 TROPD_CUDA_ARCH=90 TROPD_GPU_BUILD_DIR=build/gpu-bare bash scripts/gpu_check.sh
#   bash scripts/gpu_counts.sh --build build/gpu-bare
# Arguments go to gpu_counts.py (--help: kernel patterns, --list, --arch, --markdown, ...).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1

TOOLS=build/cuda-tools
nvcc=$(command -v nvcc || true)
[[ -z $nvcc && -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]] && nvcc=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
cuda_bin=${nvcc:+$(dirname "$nvcc")}

find_tool() { # name
  local t
  if t=$(command -v "$1" 2>/dev/null); then echo "$t"; return; fi
  if [[ -n $cuda_bin && -x $cuda_bin/$1 ]]; then echo "$cuda_bin/$1"; return; fi
  for t in "$TOOLS"/nvidia/*/bin/"$1"; do
    [[ -x $t ]] && { echo "$t"; return; }
  done
  return 1
}

if ! find_tool cuobjdump >/dev/null || ! find_tool nvdisasm >/dev/null; then
  echo "gpu_counts.sh: installing cuobjdump and nvdisasm from PyPI into $TOOLS" >&2
  python3 -m pip install -q --disable-pip-version-check --target "$TOOLS" \
    "nvidia-cuda-cuobjdump>=13,<14" "nvidia-cuda-nvdisasm>=13,<14" >&2
fi
TROPD_CUOBJDUMP=$(find_tool cuobjdump) || { echo "gpu_counts.sh: cuobjdump not found" >&2; exit 1; }
TROPD_NVDISASM=$(find_tool nvdisasm) || { echo "gpu_counts.sh: nvdisasm not found" >&2; exit 1; }
TROPD_PTXAS=$(find_tool ptxas || true)
export TROPD_CUOBJDUMP TROPD_NVDISASM TROPD_PTXAS
exec python3 scripts/gpu_counts.py "$@"
