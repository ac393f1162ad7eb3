// tests/dist/cases_a.cpp: instantiations of the distributed test cases (tests/dist/cases_impl.hpp).
#include "dist/cases_impl.hpp"

namespace tropd_dist_test::cases_detail {

void register_a(std::map<std::string, factory>& m) {
  m["opd"] = make<fp32 | served>(presets::opd());
  m["opd_ppo"] = make<fp32>(presets::opd({.clip = {.eps_low = 0.2, .eps_high = 0.2, .dual_c = 3}}));
  m["eopd"] = make<fp32 | fp64>(presets::eopd());
  m["reopold_1"] = make<fp32>(presets::reopold(), 3);                // phase I (step < switch_step)
  m["reopold_2"] = make<fp32 | served>(presets::reopold(), 150);     // phase II: the entropy quantile
  m["entropy_opd"] = make<fp32>(presets::entropy_opd());
}

}  // namespace tropd_dist_test::cases_detail
