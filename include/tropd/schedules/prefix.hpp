// tropd/schedules/prefix.hpp: prefix-mixing schedules for off-policy guidance (method.md 4.4,
// 10.5) and REOPOLD's phase switch (method.md 5).
//
// At optimiser step i of N, each prompt keeps a teacher prefix of length
//   l = floor(alpha * L_T)                        prefix_cap::per_sample_fraction (default)
//   l = min(L_T, floor(alpha * global_max))      prefix_cap::global_cap (the paper's text)
// clamped to [0, L_T], where L_T is that prompt's teacher-response length WITHOUT its end token
// (the end token is never part of a prefix: the caller strips it before passing L_T, as
// schedules/plan.hpp does). alpha = schedule.fraction(point) is in [0, 1].
//
// Schedules (t = i / N clamped to [0, 1], see `progress`):
//   cosine            alpha = (1 + cos(pi t)) / 2, exactly 0 for i >= N      (the paper's)
//   linear            alpha = 1 - t
//   exponential       alpha = exp(-rate t); with zero_at_end, exactly 0 for i >= N
//   step              alpha = high for i < switch_fraction N, low from there on
//   constant          alpha = value
//   random_fraction   alpha = base.alpha(i, N) * (lo + (hi - lo) u), u ~ U(0, 1] from Philox
//                     keyed by (seed, step = i, sequence = sample_id, position = 0,
//                     stream = streams::prefix_fraction): a per-sample random fraction.
//
// Each schedule is a trivially copyable aggregate whose member functions are TROPD_HD pure
// functions of a `schedule_point` (step, total steps, teacher length, sample id, seed), so the
// host and a CUDA kernel compute the same prefix lengths. `check()` validates the parameters.
#pragma once

#include <stdint.h>

#include <concepts>
#include <type_traits>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/random.hpp>
#include <tropd/core/status.hpp>
#include <tropd/schedules/phase.hpp>

namespace tropd::schedules {

/// Everything a schedule may depend on, for one sample at one step.
struct schedule_point {
  long long step = 0;            ///< optimiser step i (0-based)
  long long total_steps = 0;     ///< N, the number of steps of the run
  long long teacher_length = 0;  ///< L_T: teacher-response length without its end token
  long long sample_id = 0;       ///< a stable id of the sample (keys per-sample randomness)
  uint64_t seed = 0;             ///< the user's seed (keys per-sample randomness)
};

/// t = i / N clamped to [0, 1]: 0 for i <= 0, 1 for i >= N. A non-positive N counts as a
/// finished schedule (t = 1 for every i >= N, so alpha is at its final value); validating
/// N > 0 is the caller's job (make_plan does it).
TROPD_HD constexpr double progress(long long step, long long total_steps) noexcept {
  if (step >= total_steps) return 1.0;
  if (step <= 0) return 0.0;
  return static_cast<double>(step) / static_cast<double>(total_steps);
}

namespace detail {
inline constexpr double pi = 3.141592653589793238462643383279502884;
/// Epsilon added before the floor of alpha * length: a product that is an integer in exact
/// arithmetic but rounds to just below it in double (0.29 * 100 = 28.999999999999996) still
/// floors to that integer. Exact for lengths up to ~1e6 tokens (double spacing there is
/// ~1.2e-10 < 1e-9); a product that is truly within 1e-9 below an integer rounds up.
inline constexpr double floor_epsilon = 1e-9;
/// True for x in [0, 1] (false for NaN).
TROPD_HD constexpr bool in_unit_interval(double x) noexcept { return x >= 0.0 && x <= 1.0; }
}  // namespace detail

/// A prefix schedule: a trivially copyable object with a pure `fraction(point)` in [0, 1]
/// and a parameter check.
template <class S>
concept prefix_schedule =
    std::is_trivially_copyable_v<S> && requires(const S& s, const schedule_point& p) {
      { s.fraction(p) } -> std::same_as<double>;
      { s.check() } -> std::same_as<status>;
    };

/// A prefix schedule that depends on (step, total steps) only, through `alpha(i, N)`
/// (fraction(p) == alpha(p.step, p.total_steps)). These can be a random_fraction's base.
template <class S>
concept alpha_schedule = prefix_schedule<S> && requires(const S& s, long long i, long long n) {
  { s.alpha(i, n) } -> std::same_as<double>;
};

// ---------------------------------------------------------------------------------------
// Deterministic schedules
// ---------------------------------------------------------------------------------------

/// The paper's schedule: alpha(i) = (1 + cos(pi i / N)) / 2, i.e. 1, 0.854, 0.5, 0.146, 0 at
/// i/N = 0, 1/4, 1/2, 3/4, 1. Exactly 1 for i <= 0 and exactly 0 for i >= N. No parameters.
struct cosine {
  TROPD_HD double alpha(long long step, long long total_steps) const noexcept {
    if (step >= total_steps) return 0.0;
    if (step <= 0) return 1.0;
    return 0.5 * (1.0 + ::cos(detail::pi * progress(step, total_steps)));
  }
  TROPD_HD double fraction(const schedule_point& p) const noexcept { return alpha(p.step, p.total_steps); }
  TROPD_HD constexpr status check() const noexcept { return ok_status(); }
};
static_assert(alpha_schedule<cosine>);

/// alpha(i) = 1 - i / N, clamped to [0, 1] (1 for i <= 0, 0 for i >= N). No parameters.
struct linear {
  TROPD_HD double alpha(long long step, long long total_steps) const noexcept {
    return 1.0 - progress(step, total_steps);
  }
  TROPD_HD double fraction(const schedule_point& p) const noexcept { return alpha(p.step, p.total_steps); }
  TROPD_HD constexpr status check() const noexcept { return ok_status(); }
};
static_assert(alpha_schedule<linear>);

/// alpha(i) = exp(-rate * t), t = i / N clamped to [0, 1]: 1 at i = 0, exp(-rate) at i = N.
/// `zero_at_end = true` makes alpha exactly 0 for i >= N (a jump from exp(-rate) to 0 at the
/// last step, so the run ends fully on-policy as with `cosine`); with the default `false` the
/// schedule is the plain exponential and stays at exp(-rate) from i = N on.
/// Parameters: rate > 0 and finite (default 5: alpha(N) = e^-5 ~ 0.0067).
struct exponential {
  double rate = 5.0;
  bool zero_at_end = false;

  TROPD_HD double alpha(long long step, long long total_steps) const noexcept {
    if (zero_at_end && step >= total_steps) return 0.0;
    return exp_(-rate * progress(step, total_steps));
  }
  TROPD_HD double fraction(const schedule_point& p) const noexcept { return alpha(p.step, p.total_steps); }
  TROPD_HD constexpr status check() const noexcept {
    if (!(rate > 0.0) || !is_finite(rate))
      return make_error(errc::invalid_parameter, "exponential schedule: rate must be finite and > 0");
    return ok_status();
  }
};
static_assert(alpha_schedule<exponential>);

/// Two-level step: alpha(i) = high while i < switch_fraction * N, low from there on (every
/// i >= N gets `low`). The comparison is i + 1e-9 >= switch_fraction * N, so a switch point
/// that is an integer in exact arithmetic is not moved by rounding (0.3 * 10 switches at i = 3).
/// Parameters: switch_fraction, high, low in [0, 1] (defaults 0.5, 1, 0: teacher prefix for
/// the first half, pure on-policy after). The schedule is non-increasing iff high >= low.
struct step {
  double switch_fraction = 0.5;
  double high = 1.0;
  double low = 0.0;

  /// True from the switch step on.
  TROPD_HD constexpr bool switched(long long step_i, long long total_steps) const noexcept {
    if (step_i >= total_steps) return true;
    return static_cast<double>(step_i) + detail::floor_epsilon >=
           switch_fraction * static_cast<double>(total_steps);
  }
  TROPD_HD constexpr double alpha(long long step_i, long long total_steps) const noexcept {
    return switched(step_i, total_steps) ? low : high;
  }
  TROPD_HD constexpr double fraction(const schedule_point& p) const noexcept {
    return alpha(p.step, p.total_steps);
  }
  TROPD_HD constexpr status check() const noexcept {
    if (!detail::in_unit_interval(switch_fraction))
      return make_error(errc::invalid_parameter, "step schedule: switch_fraction must be in [0, 1]");
    if (!detail::in_unit_interval(high) || !detail::in_unit_interval(low))
      return make_error(errc::invalid_parameter, "step schedule: high and low must be in [0, 1]");
    return ok_status();
  }
};
static_assert(alpha_schedule<step>);

/// alpha(i) = value for every step. Parameter: value in [0, 1] (default 0.5). value = 0 turns
/// off-policy guidance off (plain OPD); value = 1 always keeps the whole teacher response.
struct constant {
  double value = 0.5;

  TROPD_HD constexpr double alpha(long long, long long) const noexcept { return value; }
  TROPD_HD constexpr double fraction(const schedule_point&) const noexcept { return value; }
  TROPD_HD constexpr status check() const noexcept {
    if (!detail::in_unit_interval(value))
      return make_error(errc::invalid_parameter, "constant schedule: value must be in [0, 1]");
    return ok_status();
  }
};
static_assert(alpha_schedule<constant>);

// ---------------------------------------------------------------------------------------
// Per-sample random fraction
// ---------------------------------------------------------------------------------------

/// A per-sample random fraction scaled by a step schedule:
///   fraction(p) = base.alpha(p.step, p.total_steps) * min(hi, lo + (hi - lo) * u),
///   u = uniform_open0_closed1(draw_key{p.seed, p.step, p.sample_id, 0, streams::prefix_fraction})
/// so u is uniform in (0, 1] and the scale is uniform in (lo, hi]. The same (seed, step,
/// sample_id) always gives the same fraction, on the host and on the device.
/// E[fraction] = base.alpha(i, N) * (lo + hi) / 2 (`mean_alpha`; exact up to 2^-54 * (hi - lo)).
/// Parameters: 0 <= lo <= hi <= 1 (defaults 0, 1) and a valid base (default cosine).
template <alpha_schedule Base = cosine>
struct random_fraction {
  double lo = 0.0;
  double hi = 1.0;
  Base base{};

  /// The Philox key of sample `p`'s draw.
  TROPD_HD static constexpr draw_key key(const schedule_point& p) noexcept {
    return draw_key{p.seed, static_cast<uint64_t>(p.step), static_cast<uint64_t>(p.sample_id), 0,
                    streams::prefix_fraction};
  }
  /// The scale lo + (hi - lo) u in (lo, hi] of sample `p` (before the base alpha).
  TROPD_HD double scale(const schedule_point& p) const noexcept {
    const double u = uniform_open0_closed1(key(p));
    return min_(hi, lo + (hi - lo) * u);
  }
  TROPD_HD double fraction(const schedule_point& p) const noexcept {
    return base.alpha(p.step, p.total_steps) * scale(p);
  }
  /// Expected fraction over samples at step i: base.alpha(i, N) * (lo + hi) / 2.
  TROPD_HD double mean_alpha(long long step_i, long long total_steps) const noexcept {
    return base.alpha(step_i, total_steps) * 0.5 * (lo + hi);
  }
  TROPD_HD constexpr status check() const noexcept {
    if (!detail::in_unit_interval(lo) || !detail::in_unit_interval(hi))
      return make_error(errc::invalid_parameter, "random_fraction schedule: lo and hi must be in [0, 1]");
    if (!(lo <= hi)) return make_error(errc::invalid_parameter, "random_fraction schedule: lo must be <= hi");
    return base.check();
  }
};
static_assert(prefix_schedule<random_fraction<>>);
static_assert(prefix_schedule<random_fraction<linear>>);

// ---------------------------------------------------------------------------------------
// Prefix length
// ---------------------------------------------------------------------------------------

/// How alpha becomes a prefix length (method.md 10.5).
enum class prefix_cap : uint8_t {
  per_sample_fraction = 0,  ///< l = floor(alpha * L_T)                     (authors' code; default)
  global_cap = 1,           ///< l = min(L_T, floor(alpha * global_max))    (the paper's text)
};

/// The teacher-prefix length of one sample, in [0, L_T] with L_T = p.teacher_length, the
/// teacher-response length WITHOUT its end token (the end token is never part of a prefix).
///   per_sample_fraction: floor(alpha * L_T + 1e-9)
///   global_cap:          min(L_T, floor(alpha * global_max + 1e-9))   (global_max <= 0 gives 0)
/// global_max is read only in global_cap mode (pass 0 otherwise).
/// alpha = schedule.fraction(p), clamped to [0, 1] (NaN counts as 0). The 1e-9 keeps products
/// that are integers in exact arithmetic from flooring one below (detail::floor_epsilon);
/// alpha = 1 gives exactly L_T, alpha = 0 gives 0, L_T <= 0 gives 0.
template <prefix_schedule S>
TROPD_HD long long prefix_length(const S& schedule, const schedule_point& p, prefix_cap mode,
                                 long long global_max) noexcept {
  const long long L = p.teacher_length;
  if (L <= 0) return 0;
  double a = schedule.fraction(p);
  if (!(a > 0.0)) return 0;  // also NaN
  if (a > 1.0) a = 1.0;
  const long long base = (mode == prefix_cap::global_cap) ? global_max : L;
  if (base <= 0) return 0;
  const double x = a * static_cast<double>(base) + detail::floor_epsilon;
  if (x >= static_cast<double>(L)) return L;        // also keeps the cast below in range
  const long long l = static_cast<long long>(x);    // x >= 0: truncation is floor
  return l < 0 ? 0 : (l > L ? L : l);
}

}  // namespace tropd::schedules
