// tropd/core/numerics.hpp: scalar numerics shared by host and device code.
//
// Every function here is TROPD_HD and has no dependency beyond <cmath>-style
// builtins, so the CPU backend and the CUDA kernels call the same code.
//
//   logaddexp(x, y) = log(e^x + e^y)            exact for -inf arguments
//   log1mexp(x)     = log(1 - e^x), x <= 0      (Maechler's two-branch rule)
//   lse_state       = (max, sum e^{x - max})    an online log-sum-exp that merges associatively
#pragma once

#include <math.h>

#include <tropd/config.hpp>

namespace tropd {

/// +infinity of type T, usable in host and device code.
template <class T>
TROPD_HD constexpr T inf() noexcept { return static_cast<T>(__builtin_huge_val()); }

/// A quiet NaN of type T, usable in host and device code.
template <class T>
TROPD_HD constexpr T quiet_nan() noexcept { return static_cast<T>(__builtin_nan("")); }

/// The smallest positive normal number of T (float or double).
template <class T>
TROPD_HD constexpr T min_normal() noexcept { return sizeof(T) == 4 ? T(1.17549435082228750797e-38) : T(2.2250738585072014e-308); }

TROPD_HD inline float exp_(float x) noexcept { return ::expf(x); }
TROPD_HD inline double exp_(double x) noexcept { return ::exp(x); }
TROPD_HD inline float log_(float x) noexcept { return ::logf(x); }
TROPD_HD inline double log_(double x) noexcept { return ::log(x); }
TROPD_HD inline float log1p_(float x) noexcept { return ::log1pf(x); }
TROPD_HD inline double log1p_(double x) noexcept { return ::log1p(x); }
TROPD_HD inline float expm1_(float x) noexcept { return ::expm1f(x); }
TROPD_HD inline double expm1_(double x) noexcept { return ::expm1(x); }
TROPD_HD inline float abs_(float x) noexcept { return ::fabsf(x); }
TROPD_HD inline double abs_(double x) noexcept { return ::fabs(x); }

/// True for NaN (written without <cmath> classification so -ffast-math builds of
/// host code that includes this header still compile; tropd itself never uses fast-math).
template <class T>
TROPD_HD constexpr bool is_nan(T x) noexcept { return !(x == x); }
/// True for finite values (not NaN, not +-inf).
template <class T>
TROPD_HD constexpr bool is_finite(T x) noexcept { return x == x && x != inf<T>() && x != -inf<T>(); }

template <class T>
TROPD_HD constexpr T max_(T a, T b) noexcept { return a < b ? b : a; }
template <class T>
TROPD_HD constexpr T min_(T a, T b) noexcept { return b < a ? b : a; }

/// log(e^x + e^y); -inf is the identity, so logaddexp(-inf, -inf) = -inf.
template <class T>
TROPD_HD inline T logaddexp(T x, T y) noexcept {
  const T m = max_(x, y);
  if (m == -inf<T>()) return -inf<T>();
  const T d = (x < y) ? x - y : y - x;  // <= 0
  return m + log1p_(exp_(d));
}

/// log(1 - e^x) for x <= 0; returns -inf at x = 0 and NaN for x > 0.
template <class T>
TROPD_HD inline T log1mexp(T x) noexcept {
  if (x > T(0)) return quiet_nan<T>();
  // Maechler (2012): use log(-expm1(x)) near 0, log1p(-exp(x)) far from 0.
  constexpr T ln_half = T(-0.693147180559945309417232121458176568L);
  return (x > ln_half) ? log_(-expm1_(x)) : log1p_(-exp_(x));
}

/// Online log-sum-exp: the pair (m, s) stands for log(s) + m = log(sum_i e^{x_i}).
/// The empty state is (-inf, 0); `merge` is associative and commutative, so partial
/// states of chunks, threads, CUDA blocks or vocabulary shards combine in any order.
template <class T>
struct lse_state {
  T m = -inf<T>();
  T s = T(0);

  /// Adds one element x (may be -inf, which changes nothing).
  TROPD_HD constexpr void push(T x) noexcept {
    if (x == -inf<T>()) return;
    if (x > m) {
      s = s * exp_(m - x) + T(1);
      m = x;
    } else {
      s += exp_(x - m);
    }
  }
  /// Combines two partial states.
  TROPD_HD constexpr void merge(const lse_state& o) noexcept {
    if (o.m == -inf<T>()) return;
    if (m == -inf<T>()) { *this = o; return; }
    if (o.m > m) {
      s = s * exp_(m - o.m) + o.s;
      m = o.m;
    } else {
      s += o.s * exp_(o.m - m);
    }
  }
  /// log(sum e^{x_i}); -inf for the empty state.
  TROPD_HD constexpr T value() const noexcept { return m == -inf<T>() ? -inf<T>() : m + log_(s); }
};

}  // namespace tropd
