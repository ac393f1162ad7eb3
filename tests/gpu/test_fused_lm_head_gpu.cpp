// Host side of the device fused LM head tests (tests/gpu/fused_lm_head_device.cu).
#include <doctest/doctest.h>

#include "gpu/fused_lm_head_device.hpp"

TEST_CASE("gpu fused LM head: every instantiation compiles and checks its arguments before any device work") {
  CHECK(tropd_gpu_fused_compile_check() == 0);
}

TEST_CASE("gpu fused LM head: cuBLASLt row-major GEMMs, transform kernels and the chunk loop against the host (bf16, soft-cap, bias)") {
  double err = -1;
  CHECK(tropd_gpu_fused_echo_check(&err) == 0);
  MESSAGE("max relative error " << err);
}
