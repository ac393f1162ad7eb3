// tests/reference/helpers.hpp: shared test utilities (random rows, element conversion,
// comparisons against the naive reference). Test-only; not part of the library.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/naive.hpp"

namespace tropd_test {

using naive::ld;
using naive::vec;

/// The objective with its top-k outlier term's k set to the width K of the lists a
/// token-level test passes (the library requires k = K there); objectives without a top-k
/// term, and k < 1 (a parameter test), are returned unchanged.
template <class Obj>
Obj with_k(Obj o, int64_t K) {
  if constexpr (requires { o.outlier.fkl.k; })
    if (K > 0 && o.outlier.fkl.k >= 1) o.outlier.fkl.k = static_cast<int>(K);
  return o;
}

/// Storage value of type T nearest to x (16-bit types via the library's fp32 rounding,
/// which tests/core/test_types.cpp checks against an independent rounding reference).
template <class T>
T make(double x) {
  if constexpr (std::is_same_v<T, tropd::bf16>)
    return tropd::bf16::from_float(static_cast<float>(x));
  else if constexpr (std::is_same_v<T, tropd::fp16>)
    return tropd::fp16::from_float(static_cast<float>(x));
  else
    return static_cast<T>(x);
}

/// Exact value of a stored element, decoded independently of the library.
inline ld value_of(float x) { return x; }
inline ld value_of(double x) { return x; }
inline ld value_of(tropd::bf16 x) { return naive::decode_bf16(x.bits); }
inline ld value_of(tropd::fp16 x) { return naive::decode_fp16(x.bits); }

/// Row r of a row-major [rows x V] array as long doubles.
template <class T>
vec row_ld(const std::vector<T>& m, int64_t r, int64_t V, int64_t stride = -1) {
  if (stride < 0) stride = V;
  vec out(static_cast<size_t>(V));
  for (int64_t j = 0; j < V; ++j) out[static_cast<size_t>(j)] = value_of(m[static_cast<size_t>(r * stride + j)]);
  return out;
}

/// rows x V array of normal(mean, sd) values stored as T.
template <class T>
std::vector<T> random_rows(std::mt19937_64& rng, int64_t rows, int64_t V, double sd, double mean = 0) {
  std::normal_distribution<double> nd(mean, sd);
  std::vector<T> out(static_cast<size_t>(rows * V));
  for (auto& x : out) x = make<T>(nd(rng));
  return out;
}

inline ld max_abs(const vec& x) {
  ld m = 0;
  for (ld v : x) m = std::max(m, std::fabs(v));
  return m;
}

/// max_j |got_j - ref_j| / max(max_j |ref_j|, floor): the gradient error relative to the
/// gradient's own scale.
template <class G>
ld grad_rel_err(const G* got, const vec& ref, ld floor = 1e-30L) {
  ld err = 0;
  for (size_t j = 0; j < ref.size(); ++j) err = std::max(err, std::fabs(static_cast<ld>(got[j]) - ref[j]));
  return err / std::max(max_abs(ref), floor);
}
inline ld grad_rel_err(const vec& got, const vec& ref, ld floor = 1e-30L) { return grad_rel_err(got.data(), ref, floor); }

/// |got - ref| <= tol * max(1, |ref|).
inline bool close_value(ld got, ld ref, ld tol) { return std::fabs(got - ref) <= tol * std::max<ld>(1, std::fabs(ref)); }

/// True when every element is finite.
template <class G>
bool all_finite(const std::vector<G>& x) {
  for (const auto& v : x)
    if (!std::isfinite(static_cast<double>(v))) return false;
  return true;
}

template <class T>
bool bit_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace tropd_test
