// fuzz/driver.hpp: the body of every libFuzzer entry point (fuzz/fuzz_*.cpp).
//
// A failed check prints its message and aborts (libFuzzer then saves the input as a crash).
// With TROPD_FUZZ_IGNORE_KNOWN=1 in the environment, failures tagged with a known open
// library issue (docs/robustness.md, "Known issues") do not abort: the first input that
// reproduces each tag is reported once on stderr ("known issue B2 reproduces: ..."), so a
// fuzzing run keeps looking for new problems and still says which known ones it met.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

#include "common.hpp"

namespace tropd_fuzz {

inline int fuzz_one(result (*check)(const uint8_t*, size_t), const uint8_t* data, size_t size) {
  static const bool ignore_known = [] {
    const char* e = std::getenv("TROPD_FUZZ_IGNORE_KNOWN");
    return e && *e && std::strcmp(e, "0") != 0;
  }();
  static std::set<std::string> seen;
  const result r = check(data, size);
  if (r.ok) return 0;
  if (ignore_known && !r.known.empty()) {
    if (seen.insert(r.known).second) {
      std::fprintf(stderr, "\n==== known issue %s reproduces (ignored): %s\n", r.known.c_str(), r.message.c_str());
      std::fflush(stderr);
    }
    return 0;
  }
  std::fprintf(stderr, "\n==== tropd fuzz check failed%s%s ====\n%s\n", r.known.empty() ? "" : ": known issue ",
               r.known.c_str(), r.message.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace tropd_fuzz
