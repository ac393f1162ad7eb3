// tests/dist/cases_b.cpp: instantiations of the distributed test cases (tests/dist/cases_impl.hpp).
#include "dist/cases_impl.hpp"

namespace tropd_dist_test::cases_detail {

void register_b(std::map<std::string, factory>& m) {
  m["clip_outlier"] = make<fp32>(presets::clip_outlier({.tau = -3, .guidance_beta = 1e-3}));
  m["mask_outlier"] = make<fp32 | served>(presets::mask_outlier({.tau = -3}));
  m["fkl_outlier"] = make<fp32 | served>(presets::fkl_outlier());
  m["tropd"] = make<fp32 | fp64 | served>(presets::tropd());
  m["tropd_p_tail"] =
      make<fp32 | fp64 | served>(presets::tropd({.k = 16, .form = presets::fkl_form::p, .tail = presets::topk_tail::tail_bucket}));
  m["tropd_c_raw"] = make<fp32>(presets::tropd({.k = 32, .clamp = 5, .tail = presets::topk_tail::raw}));
}

}  // namespace tropd_dist_test::cases_detail
