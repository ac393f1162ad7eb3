// libFuzzer entry point of the "rows" target (see fuzz/targets.hpp). Only this target's
// header is included, so each fuzzer compiles one target's instantiations.
#include <stddef.h>
#include <stdint.h>

#include "driver.hpp"
#include "target_rows.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return tropd_fuzz::fuzz_one(&tropd_fuzz::rows::check, data, size);
}
