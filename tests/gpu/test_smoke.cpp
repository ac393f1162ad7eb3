// Host side of the CUDA smoke test (tests/gpu/smoke.cu).
#include <doctest/doctest.h>

#include "gpu/smoke.hpp"

TEST_CASE("gpu smoke: kernel launch, CUB block reduction, copy back") {
  CHECK(tropd_gpu_smoke() == 0);
}
