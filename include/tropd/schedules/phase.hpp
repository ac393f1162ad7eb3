// tropd/schedules/phase.hpp: REOPOLD's two training phases (method.md 5), the one rule that
// says which phase a step is in. regions::phase_switch (which region rule applies) and the
// driver's schedules read it from here.
#pragma once

#include <type_traits>

#include <tropd/config.hpp>
#include <tropd/core/status.hpp>

namespace tropd::schedules {

/// Phase 0 (exploration: keep tokens with R >= floor) for step < switch_step, phase 1
/// (refinement: top-entropy tokens) from switch_step on.
struct phase_switch {
  long long switch_step = 0;

  TROPD_HD constexpr int phase(long long step_i) const noexcept { return step_i >= switch_step ? 1 : 0; }
  TROPD_HD constexpr status check() const noexcept {
    if (switch_step < 0) return make_error(errc::invalid_parameter, "phase_switch: switch_step must be >= 0");
    return ok_status();
  }
};
static_assert(std::is_trivially_copyable_v<phase_switch>);

/// REOPOLD's default switch step: mid-training, total_steps / 2 (integer division).
TROPD_HD constexpr long long reopold_default_switch(long long total_steps) noexcept { return total_steps / 2; }

}  // namespace tropd::schedules
