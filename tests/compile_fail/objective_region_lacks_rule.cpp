// expect: satisfaction of [^ ]*trust_region<Region>
// A region type without the per-token rule `trusted(token_view, batch_context) -> bool`
// does not satisfy the concept tropd::regions::trust_region, which tropd::objective
// requires of its first parameter: the compiler names the unsatisfied concept.
#include <tropd/objective.hpp>

struct region_without_rule {
  static constexpr bool needs_student_entropy = false, needs_teacher_entropy = false;
  tropd::status check() const noexcept { return {}; }
  // missing: bool trusted(const tropd::regions::token_view&, const tropd::regions::batch_context&) const;
};

tropd::objective<region_without_rule, tropd::estimators::k1_reward, tropd::outliers::drop, tropd::clippers::no_clip> instance;
