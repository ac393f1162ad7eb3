// expect: k1 used as a differentiated loss has zero expected gradient
// k1 = s - t differentiated through s has E_y~p[(e_y - p)] = 0 (method.md 2.1): the pair
// sampled<k1, as_loss> must not compile, also when it is plugged into an objective as the
// trust estimator (the library's static_assert in estimators/sampled.hpp fires).
#include <tropd/objective.hpp>

using useless_trust = tropd::estimators::sampled_term<tropd::estimators::k1, tropd::estimators::as_loss>;
using bad_objective =
    tropd::objective<tropd::regions::all_trusted, useless_trust, tropd::outliers::drop, tropd::clippers::no_clip>;

bad_objective instance;
