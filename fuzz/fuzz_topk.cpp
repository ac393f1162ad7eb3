// libFuzzer entry point of the "topk" target (see fuzz/targets.hpp). Only this target's
// header is included, so each fuzzer compiles one target's instantiations.
#include <stddef.h>
#include <stdint.h>

#include "driver.hpp"
#include "target_topk.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return tropd_fuzz::fuzz_one(&tropd_fuzz::topk::check, data, size);
}
