// tests/dist/cases_c.cpp: instantiations of the distributed test cases (tests/dist/cases_impl.hpp).
#include "dist/cases_impl.hpp"

namespace tropd_dist_test::cases_detail {

void register_c(std::map<std::string, factory>& m) {
  m["gkd"] = make<fp32 | fp64>(presets::gkd());
  m["vopd"] = make<fp32>(presets::vopd());
  m["gopd"] = make<fp32>(presets::gopd());
  seq_bound_objective sb;
  sb.region.bound = 4;
  sb.guidance_beta = 1e-3;
  m["seq_bound"] = make<fp32>(sb);
  auto sm = presets::opd();
  sm.agg.how = tropd::aggregation::mode::seq_mean_token_mean;
  m["seq_mean"] = make<fp32>(sm);
}

}  // namespace tropd_dist_test::cases_detail
