// Replays the fuzz corpus (fuzz/corpus/<target>/*) through the fuzz targets' check
// functions (fuzz/targets.hpp) as ordinary tests: every file must pass its oracle.
//
// fuzz/known/<target>/known-<ID>-* reproduce open library issues of docs/robustness.md
// ("Known issues"; each also has a failing "open issue" test). They are replayed too: each
// must pass or fail only with the issue its name gives (anything else is a new failure), and
// a file that passes is reported (the issue looks fixed: move the file into the corpus).
// The corpus directory comes from the compile definition TROPD_FUZZ_CORPUS_DIR
// (tests/CMakeLists.txt; fuzz/known is its sibling); TROPD_FUZZ_CORPUS overrides it.
#include <stdint.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "../../fuzz/targets.hpp"

#ifndef TROPD_FUZZ_CORPUS_DIR
#error "tests/CMakeLists.txt defines TROPD_FUZZ_CORPUS_DIR (the fuzz corpus)"
#endif

namespace {

std::filesystem::path corpus_root() {
  if (const char* e = std::getenv("TROPD_FUZZ_CORPUS"); e && *e) return e;
  return TROPD_FUZZ_CORPUS_DIR;
}

std::vector<std::filesystem::path> files_of(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> out;
  if (!std::filesystem::is_directory(dir)) return out;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file()) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

void replay(const tropd_fuzz::target& t) {
  const auto files = files_of(corpus_root() / t.name);
  INFO("corpus directory: ", (corpus_root() / t.name).string());
  REQUIRE_MESSAGE(!files.empty(), "the fuzz corpus of target '", std::string(t.name), "' is missing or empty");
  int failed = 0;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    const std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const tropd_fuzz::result r = t.check(data.data(), data.size());
    if (!r.ok) ++failed;
    CHECK_MESSAGE(r.ok, f.filename().string(), ": ", r.known.empty() ? std::string("NEW failure") : "known issue " + r.known + " (docs/robustness.md)",
                  "\n", r.message);
  }
  MESSAGE(std::string(t.name), ": ", files.size(), " corpus files, ", failed, " failing");
}

}  // namespace

/// fuzz/known/<target>/known-<ID>-*: pass, or fail with exactly issue <ID>.
static void replay_known(const tropd_fuzz::target& t) {
  const auto files = files_of(corpus_root() / ".." / "known" / t.name);
  for (const auto& f : files) {
    const std::string name = f.filename().string();
    std::string id = name.rfind("known-", 0) == 0 ? name.substr(6) : std::string();
    id = id.substr(0, id.find('-'));
    std::ifstream in(f, std::ios::binary);
    const std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const tropd_fuzz::result r = t.check(data.data(), data.size());
    if (r.ok) {
      MESSAGE(name, ": passes now: issue ", id, " looks fixed (move the file into fuzz/corpus/", std::string(t.name), ")");
      continue;
    }
    CHECK_MESSAGE(r.known == id, name, ": expected known issue ", id, ", got ", r.known.empty() ? std::string("a NEW failure") : r.known,
                  "\n", r.message);
  }
}

TEST_CASE("fuzz corpus: rows (divergence_rows, sampled_rows)") { replay(tropd_fuzz::targets[0]); }
TEST_CASE("fuzz corpus: topk (topk_forward_kl_rows, logits and lists)") { replay(tropd_fuzz::targets[1]); }
TEST_CASE("fuzz corpus: objective (evaluate_tokens, presets, input policies)") { replay(tropd_fuzz::targets[2]); }
TEST_CASE("fuzz corpus: known open issues reproduce only themselves (fuzz/known)") {
  for (const auto& t : tropd_fuzz::targets) replay_known(t);
}
