// expect: satisfaction of [^ ]*outlier_handler<Outlier>
// An outlier handler must say whether it reads the teacher's top-k lists
// (`static constexpr bool needs_topk`): the host backends validate and gather top-k data
// only for handlers that need them. Without the flag the type does not satisfy
// tropd::outliers::outlier_handler and tropd::objective refuses it.
#include <tropd/objective.hpp>

struct handler_without_flag {
  tropd::status check() const noexcept { return {}; }
  tropd::outliers::outlier_value operator()(double, const tropd::outliers::topk_row&, double*) const noexcept {
    tropd::outliers::outlier_value v;
    v.kept = false;
    return v;
  }
  // missing: static constexpr bool needs_topk = false;
};

tropd::objective<tropd::regions::all_trusted, tropd::estimators::k1_reward, handler_without_flag, tropd::clippers::no_clip>
    instance;
