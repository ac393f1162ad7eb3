// tests/dist/cases.cpp: the table of tests/dist/cases.hpp's cases (instantiated in
// cases_a.cpp, cases_b.cpp, cases_c.cpp).
#include "dist/cases.hpp"

#include <map>

#include "dist/cases_impl.hpp"

namespace tropd_dist_test {

namespace {

using namespace cases_detail;

const std::map<std::string, factory>& table() {
  static const std::map<std::string, factory> t = [] {
    std::map<std::string, factory> m;
    register_a(m);
    register_b(m);
    register_c(m);
    return m;
  }();
  return t;
}

}  // namespace

std::vector<std::string> preset_names() {
  std::vector<std::string> v;
  for (const auto& [k, f] : table()) v.push_back(k);
  return v;
}

bool preset_deterministic(const std::string& name) {
  // Random draws (keyed by the position in the rank's part of a sequence) and the sequence
  // modes (a split sequence counts once per rank) need whole sequences per rank.
  return name != "fkl_outlier" && name.rfind("tropd", 0) != 0 && name != "seq_mean";
}

std::unique_ptr<case_run> make_case(const case_spec& spec) {
  const auto it = table().find(spec.preset);
  if (it == table().end()) return nullptr;
  return it->second(spec);
}

}  // namespace tropd_dist_test
