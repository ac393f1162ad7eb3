// fuzz/common.hpp: shared machinery of tropd's fuzz targets (fuzz/targets.hpp).
//
// - `input`: decodes a fuzz input byte by byte; past its end it yields bytes from a
//   splitmix64 stream seeded by a hash of the whole input, so a short input still
//   describes a complete (deterministic) case, and the fuzzer's mutations of early bytes
//   (shapes, types, parameters) matter most.
// - element values: one byte per logit, mapped to a grid in [-scale, scale] plus, from
//   real input bytes only and when the case allows them, -inf, NaN, +inf, the largest
//   finite value of the element type, 1e300 (overflows every type but double) and a
//   subnormal.
// - poison: outputs are filled with a NaN bit pattern before every call; a failed call must
//   leave them bit-identical, a successful one must overwrite every element with a finite value.
// How a call's answer is judged against what the oracle accepts (outcomes, per-row
// expectations, the judges every target shares) is fuzz/judge.hpp.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <tropd/tropd.hpp>

namespace tropd_fuzz {

using ld = long double;
using tropd::errc;
using tropd::index_t;

inline constexpr ld ldinf = std::numeric_limits<ld>::infinity();
inline constexpr double dinf = std::numeric_limits<double>::infinity();
inline constexpr float finf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------
// Results and failures.
// ---------------------------------------------------------------------------

/// What a check returns: ok, or a failure message (with a known-issue tag when the failure
/// is one of the documented open library issues).
struct result {
  bool ok = true;
  std::string known;    ///< e.g. "B2"; empty for a new failure
  std::string message;  ///< what went wrong, with the decoded case
};

/// Thrown inside a check to stop at the first failure.
struct failure {
  std::string message;
  std::string known;
};

template <class... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  os.precision(17);
  (os << ... << a);
  return os.str();
}

[[noreturn]] inline void fail(const std::string& m, const std::string& known = "") { throw failure{m, known}; }

/// What the library answered in the last check on this thread ("ok" or the errc name; empty
/// when the library was not called). Read by the corpus generator to classify inputs.
inline thread_local std::string last_outcome;
inline void note_outcome(const tropd::status& st) { last_outcome = st.ok() ? "ok" : tropd::to_string(st.code); }

inline const char* code_name(errc e) { return tropd::to_string(e); }

/// Runs `body` (which throws `failure` on a mismatch) and turns it into a result; `ctx` is
/// the decoded case, appended to every message.
template <class F>
result guarded(F&& body, const std::string* ctx) {
  last_outcome.clear();
  try {
    body();
  } catch (const failure& f) {
    return result{false, f.known, f.message + (ctx ? "\n  case: " + *ctx : std::string())};
  }
  return {};
}

// ---------------------------------------------------------------------------
// Input decoding.
// ---------------------------------------------------------------------------

class input {
 public:
  input(const uint8_t* p, size_t n) : p_(p), n_(n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
    s_ = h ^ (static_cast<uint64_t>(n) << 32);
  }
  /// Next byte; `real` says whether it came from the input (not from the filler stream).
  uint8_t u8(bool* real = nullptr) {
    if (i_ < n_) {
      if (real) *real = true;
      return p_[i_++];
    }
    if (real) *real = false;
    s_ += 0x9E3779B97F4A7C15ull;
    uint64_t z = s_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return static_cast<uint8_t>((z ^ (z >> 31)) >> 56);
  }
  int pick(int m) { return static_cast<int>(u8() % static_cast<unsigned>(m)); }
  bool bit() { return (u8() & 1) != 0; }
  template <class T, size_t N>
  T from(const T (&table)[N]) {
    return table[pick(static_cast<int>(N))];
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t i_ = 0;
  uint64_t s_;
};

// ---------------------------------------------------------------------------
// Element types.
// ---------------------------------------------------------------------------

enum class ety : int { f32 = 0, f64 = 1, bf16 = 2, fp16 = 3 };
inline const char* ety_name(ety e) {
  switch (e) {
    case ety::f32: return "f32";
    case ety::f64: return "f64";
    case ety::bf16: return "bf16";
    case ety::fp16: return "fp16";
  }
  return "?";
}

/// Largest finite value of an element type.
template <class T>
constexpr double max_finite() {
  if constexpr (std::is_same_v<T, double>) return std::numeric_limits<double>::max();
  else if constexpr (std::is_same_v<T, float>) return std::numeric_limits<float>::max();
  else if constexpr (std::is_same_v<T, tropd::bf16>) return 3.3895313892515355e38;  // 0x7f7f
  else return 65504.0;                                                           // fp16 0x7bff
}

/// float of a double without the undefined behaviour of an out-of-range conversion.
inline float to_float_sat(double x) {
  if (std::isnan(x)) return std::numeric_limits<float>::quiet_NaN();
  if (x > std::numeric_limits<float>::max()) return finf;
  if (x < -std::numeric_limits<float>::max()) return -finf;
  return static_cast<float>(x);
}

/// Stored element of type T nearest to x (16-bit types through the library's RNE from fp32,
/// which tests/core/test_types.cpp checks against an independent rounding).
template <class T>
T store(double x) {
  if constexpr (std::is_same_v<T, double>) return x;
  else if constexpr (std::is_same_v<T, float>) return to_float_sat(x);
  else if constexpr (std::is_same_v<T, tropd::bf16>) {
    // The largest finite bf16 is not representable as RNE of a float above it: store it directly.
    if (x == max_finite<T>()) return tropd::bf16{0x7f7f};
    if (x == -max_finite<T>()) return tropd::bf16{0xff7f};
    return tropd::bf16::from_float(to_float_sat(x));
  } else {
    return tropd::fp16::from_float(to_float_sat(x));
  }
}

/// Exact value of a stored element, decoded without the library (IEEE / bfloat16 definitions).
inline ld value_of(float x) { return x; }
inline ld value_of(double x) { return x; }
inline ld value_of(tropd::bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline ld value_of(tropd::fp16 x) {
  const int sign = (x.bits >> 15) & 1, e = (x.bits >> 10) & 0x1f, m = x.bits & 0x3ff;
  ld v;
  if (e == 0) v = std::ldexp(static_cast<ld>(m), -24);
  else if (e == 31) v = m ? std::numeric_limits<ld>::quiet_NaN() : ldinf;
  else v = std::ldexp(static_cast<ld>(1024 + m), e - 25);
  return sign ? -v : v;
}

/// How the element bytes of one array are decoded.
struct value_cfg {
  double scale = 1;     ///< grid [-scale, scale]
  double offset = 0;    ///< added to finite grid values
  bool neg_inf = false; ///< -inf (zero mass) allowed
  bool specials = false;///< NaN, +inf, extremes allowed (from real input bytes only)
  double type_max = 3.4e38;
};

/// One element value. Bytes 0..239 map to the grid; 240..255 are -inf / specials when allowed.
inline double element(input& in, const value_cfg& c) {
  bool real = false;
  const uint8_t b = in.u8(&real);
  if (b >= 240) {
    if (real && c.specials) {
      switch (b) {
        case 248: return std::numeric_limits<double>::quiet_NaN();
        case 249: return dinf;
        case 250: return c.type_max;
        case 251: return -c.type_max;
        case 252: return 1e300;
        case 253: return -1e300;
        case 254: return 1e-41;  // subnormal in fp32 and bf16, zero in fp16
        case 255: return -0.0;
        default: break;          // 240..247: -inf below
      }
    }
    if (c.neg_inf && (real || b >= 248)) return -dinf;  // filler bytes: -inf at 1/32
  }
  return c.offset + (static_cast<int>(b % 240) - 120) / 120.0 * c.scale;
}

inline double pick_scale(input& in, double type_max) {
  static const double scales[] = {1.0, 3.0, 0.5, 10.0, 1.0, 0.01, 30.0, 100.0, 1e4, 5e3, 1e6, 1e30, -1.0};
  const double s = in.from(scales);
  return s < 0 ? type_max : s;  // -1: the type's largest finite value
}
inline double pick_offset(input& in) {
  static const double offsets[] = {0, 0, 0, 0, 7, -40, 1e4, -1e4, 300};
  return in.from(offsets);
}

// ---------------------------------------------------------------------------
// Poison.
// ---------------------------------------------------------------------------

template <class T>
T poison() {
  if constexpr (std::is_same_v<T, double>) {
    const uint64_t u = 0x7ff4a5a5a5a5a5a5ull;  // a NaN no arithmetic produces
    double d;
    std::memcpy(&d, &u, sizeof d);
    return d;
  } else if constexpr (std::is_same_v<T, float>) {
    const uint32_t u = 0x7fa5a5a5u;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  } else {
    return static_cast<T>(0xa5);
  }
}
template <class T>
bool is_poison(const T& x) {
  const T p = poison<T>();
  return std::memcmp(&x, &p, sizeof(T)) == 0;
}
template <class T>
bool all_poison(const std::vector<T>& v) {
  for (const T& x : v)
    if (!is_poison(x)) return false;
  return true;
}

/// Machine epsilon of the work type the library uses for a pair of element types.
template <class TS, class TT>
constexpr ld work_eps() {
  return (std::is_same_v<TS, double> || std::is_same_v<TT, double>) ? ld(std::numeric_limits<double>::epsilon())
                                                                    : ld(std::numeric_limits<float>::epsilon());
}
template <class TS, class TT>
constexpr ld work_max() {
  return (std::is_same_v<TS, double> || std::is_same_v<TT, double>) ? ld(std::numeric_limits<double>::max())
                                                                    : ld(std::numeric_limits<float>::max());
}
template <class TS, class TT>
constexpr ld work_min_normal() {
  return (std::is_same_v<TS, double> || std::is_same_v<TT, double>) ? ld(std::numeric_limits<double>::min())
                                                                    : ld(std::numeric_limits<float>::min());
}

/// The first entry of a row that the library's first pass rejects. The pass scales a row into
/// the work type W as W(x) * W(1 / T) (in that order, as host/rows.hpp does); the rule
/// (docs/robustness.md, R1): a NaN / +inf input is non_finite_input at its column, a finite
/// input whose scaled value overflows W is unsupported at its column, whichever comes first.
/// `negative`: that finite input overflowed to -inf (also unsupported: R3, fixed).
/// col = -1: nothing is rejected.
struct stage_fault {
  int col = -1;
  errc code = errc::ok;
  bool negative = false;
};
template <class W>
stage_fault first_stage_fault(const std::vector<ld>& x, double T) {
  const W inv = static_cast<W>(1.0 / T);
  for (size_t v = 0; v < x.size(); ++v) {
    const ld xv = x[v];
    if (std::isnan(xv) || xv == ldinf) return {static_cast<int>(v), errc::non_finite_input, false};
    if (xv == -ldinf) continue;
    const W s = static_cast<W>(xv) * inv;
    if (std::isinf(s)) return {static_cast<int>(v), errc::unsupported, s < 0};
  }
  return {};
}

/// Long-double log_softmax of x/T over a row (-inf stays -inf), and the log-sum-exp.
inline std::vector<ld> log_softmax(const std::vector<ld>& x, ld T, ld* lse_out = nullptr) {
  ld mx = -ldinf;
  for (ld v : x) mx = std::max(mx, v / T);
  ld s = 0;
  for (ld v : x)
    if (v != -ldinf) s += std::exp(v / T - mx);
  const ld lse = mx + std::log(s);
  std::vector<ld> l(x.size());
  for (size_t i = 0; i < x.size(); ++i) l[i] = x[i] == -ldinf ? -ldinf : x[i] / T - lse;
  if (lse_out) *lse_out = lse;
  return l;
}

}  // namespace tropd_fuzz
