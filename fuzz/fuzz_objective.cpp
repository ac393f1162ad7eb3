// libFuzzer entry point of the "objective" target (see fuzz/targets.hpp). Only this target's
// header is included, so each fuzzer compiles one target's instantiations.
#include <stddef.h>
#include <stdint.h>

#include "driver.hpp"
#include "target_objective.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return tropd_fuzz::fuzz_one(&tropd_fuzz::objective::check, data, size);
}
