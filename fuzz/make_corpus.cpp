// fuzz/make_corpus.cpp: writes the seed corpus fuzz/corpus/<target>/ deterministically.
//
//   tropd-fuzz-make-corpus <corpus dir>     (CMake target of fuzz/CMakeLists.txt)
//
// For each target it runs the check on pseudo-random inputs (a fixed splitmix64 stream, half
// of the bytes small so that in-domain settings dominate) and keeps the first input of every
// class it has not seen yet: a few decoded properties of the case (estimator and element
// types / mode and tail / preset and input policy) with what the library answered ("ok" or
// the errc; at most 3 files per error code), plus the first input of every known issue.
// Files are named <verdict>-<class>-<answer>-<index>, so the corpus documents what it
// covers; rerunning the generator gives the same files for the same library behaviour.
// Inputs that reproduce a known open issue are written to <corpus>/../known/<target>/. Known-issue inputs are kept (one per issue):
// tests/fuzz/test_fuzz_corpus.cpp fails on them until the issue is fixed.
#include <stdint.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "targets.hpp"

namespace {

uint64_t next(uint64_t& s) {
  s += 0x9E3779B97F4A7C15ull;
  uint64_t z = s;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::string clean(std::string s) {
  for (char& c : s)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_')) c = '_';
  return s;
}

struct plan {
  const char* name;
  tropd_fuzz::result (*check)(const uint8_t*, size_t);
  std::string (*klass)(const uint8_t*, size_t);  // decoded properties
  size_t len;                                     // input length
  int tries;
  size_t max_files;
};

std::string rows_class(const uint8_t* d, size_t n) {
  tropd_fuzz::input in(d, n);
  const auto c = tropd_fuzz::rows::decode(in);
  return std::string(tropd_fuzz::rows::est_name(c.est)) + "_" + tropd_fuzz::ety_name(c.ts) + tropd_fuzz::ety_name(c.tt);
}
std::string topk_class(const uint8_t* d, size_t n) {
  tropd_fuzz::input in(d, n);
  const auto c = tropd_fuzz::topk::decode(in);
  static const char* tails[] = {"raw", "renorm", "bucket", "badtail"};
  return std::string(c.lists ? "lists_" : "logits_") + tails[c.tail];
}
std::string objective_class(const uint8_t* d, size_t n) {
  tropd_fuzz::input in(d, n);
  const auto c = tropd_fuzz::objective::decode(in);
  return std::string(tropd_fuzz::objective::preset_name(c.preset)) + (c.mask ? "_mask" : "_reject");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "--replay") {
    // --replay <target> <file>...: run the check on each file and print the verdict
    // (TROPD_FUZZ_DUMP=1 also prints the decoded data).
    int bad = 0;
    for (int i = 3; i < argc; ++i) {
      std::ifstream f(argv[i], std::ios::binary);
      const std::vector<uint8_t> d((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      for (const auto& t : tropd_fuzz::targets)
        if (std::string(t.name) == argv[2]) {
          const auto r = t.check(d.data(), d.size());
          std::printf("%s: %s%s (library: %s)\n%s\n", argv[i], r.ok ? "pass" : "FAIL", r.known.empty() ? "" : (" known " + r.known).c_str(),
                      tropd_fuzz::last_outcome.c_str(), r.message.c_str());
          bad += !r.ok;
        }
    }
    return bad ? 1 : 0;
  }
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir> | --replay <target> <file>...\n", argv[0]);
    return 2;
  }
  const std::filesystem::path root = argv[1];
  const plan plans[] = {
      {"rows", &tropd_fuzz::rows::check, &rows_class, 120, 20000, 40},
      {"topk", &tropd_fuzz::topk::check, &topk_class, 120, 20000, 32},
      {"objective", &tropd_fuzz::objective::check, &objective_class, 200, 20000, 40},
  };
  for (const plan& p : plans) {
    const auto dir = root / p.name;
    std::filesystem::create_directories(dir);
    std::map<std::string, int> seen;       // class -> files kept
    std::map<std::string, int> outcomes;   // library answer -> files kept
    size_t kept = 0;
    uint64_t s = 0x7470726f64ull ^ static_cast<uint64_t>(p.len);
    std::vector<uint8_t> buf;
    for (int t = 0; t < p.tries && kept < p.max_files; ++t) {
      // Lengths vary so short (filler-heavy) and long inputs both appear.
      const size_t len = 8 + next(s) % p.len;
      buf.resize(len);
      // Half of the bytes small: decoders take table entries and shapes by byte % size, and
      // the first entries of every table are the ordinary, in-domain values.
      for (auto& b : buf) {
        const uint64_t x = next(s);
        b = (x & 1) ? static_cast<uint8_t>((x >> 8) % 4) : static_cast<uint8_t>(x >> 56);
      }
      const tropd_fuzz::result r = p.check(buf.data(), buf.size());
      const std::string answer = tropd_fuzz::last_outcome.empty() ? "notrun" : tropd_fuzz::last_outcome;
      std::string verdict = r.ok ? "pass" : (r.known.empty() ? "FAIL" : "known-" + r.known);
      if (verdict == "FAIL") {
        // A new failure: not part of the corpus, saved next to it for inspection.
        const auto fdir = root / ".." / "new-failures";
        std::filesystem::create_directories(fdir);
        const std::string fn = std::string(p.name) + "-" + std::to_string(t);
        std::ofstream(fdir / fn, std::ios::binary).write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
        std::fprintf(stderr, "%s: the oracle fails on a generated input (saved as %s, not kept):\n%s\n", p.name,
                     (fdir / fn).c_str(), r.message.c_str());
        continue;
      }
      // Keep: every known issue once; every (class, answer) once, at most 3 per error code.
      const std::string cls = p.klass(buf.data(), buf.size());
      const std::string key = verdict != "pass" ? verdict : cls + "/" + answer;
      if (seen.count(key)) continue;
      if (verdict == "pass" && answer != "ok" && outcomes[answer] >= 3) continue;
      seen[key] = 1;
      if (verdict == "pass") outcomes[answer]++;
      const std::string fname = clean(verdict + "-" + cls + "-" + answer) + "-" + std::to_string(kept);
      // Inputs that reproduce an open issue go to <corpus>/../known/<target>/ (fuzz/known/):
      // the corpus itself passes; tests/fuzz/test_fuzz_corpus.cpp replays both.
      auto out_dir = dir;
      if (verdict != "pass") {
        out_dir = root / ".." / "known" / p.name;
        std::filesystem::create_directories(out_dir);
      }
      std::ofstream(out_dir / fname, std::ios::binary).write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
      ++kept;
    }
    std::printf("%s: %zu files\n", p.name, kept);
  }
  return 0;
}
