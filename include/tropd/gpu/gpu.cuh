// tropd/gpu/gpu.cuh: umbrella of the CUDA backend (nvcc only): the row functions
// (gpu/rows.cuh) and the objective at token and row level (gpu/objective.cuh), with the
// status word (gpu/status_word.cuh) and the options (gpu/config.cuh). The layers below them,
// in gpu/detail/: dispatch_*.cuh (plan and launch), *_kernels.cuh (the kernels), row_passes.cuh
// and topk_block.cuh (block-level passes), vector_io.cuh and block_ops.cuh (loads, stores,
// block collectives), and the TROPD_HD rules a CPU compiler also builds (*_rules.hpp).
#pragma once

#if !defined(__CUDACC__)
#error "tropd/gpu is CUDA code: compile this translation unit with nvcc (host-only code includes <tropd/tropd.hpp>)"
#endif

#include <tropd/gpu/config.cuh>
#include <tropd/gpu/objective.cuh>
#include <tropd/gpu/rows.cuh>
#include <tropd/gpu/status_word.cuh>
#include <tropd/policies.hpp>
