// Host side of tests/gpu/policies_device.cu: every policy's TROPD_HD code gives the same
// values on the device as on the host.
#include <doctest/doctest.h>

#include <string>

#include "gpu/policies_device.hpp"

TEST_CASE("gpu policies: every TROPD_HD policy member computes on the device what it computes on the host") {
  std::string report;
  const int r = tropd_gpu_policies_check(&report);
  INFO(report);
  CHECK(r == 0);
}
