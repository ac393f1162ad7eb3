// expect: compile this translation unit with nvcc
// The CUDA backend is device code: a host-only C++ compiler must refuse it with a clear
// message (design.md: "Device code lives in .cuh files that refuse to compile without nvcc").
#include <tropd/gpu/rows.cuh>

int main() { return 0; }
