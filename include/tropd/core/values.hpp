// tropd/core/values.hpp: views of per-token scalar arrays whose element type, fp32 or fp64,
// is a run-time tag.
//
//   values_view        [size]           read:  double x = v[i]
//   values_matrix      [rows x cols]    read:  double x = m(r, c); values_row r = m.row(r)
//   values_out         [size]           write: v.set(i, x)   (x converted to the element type)
//   values_matrix_out  [rows x cols]    write: m.set(r, c, x)
//
// Per-token arrays (log-probs, entropies, rollout-time log-probs, top-k lists) reach tropd
// as fp32 from most trainers and as fp64 from tests and from the row level (which computes
// them in double from the logits and must not narrow them on the way to the per-token rule).
// One non-template view type for both keeps the input and output structs aggregates that a
// caller fills with designated initialisers, and keeps one instantiation of every per-token
// stage. Reads widen to double; a read costs one predictable branch on the tag.
//
// Views are trivially copyable and memory-space agnostic (the host backend reads them on the
// host, the GPU backend on the device). A default-constructed view is empty ("not supplied").
#pragma once

#include <stdint.h>

#include <type_traits>
#include <utility>

#include <tropd/config.hpp>
#include <tropd/core/views.hpp>

namespace tropd {

/// Element type of a tagged view.
enum class scalar_type : uint8_t { f32 = 0, f64 = 1 };

template <class T>
inline constexpr bool is_scalar_element = std::is_same_v<std::remove_const_t<T>, float> || std::is_same_v<std::remove_const_t<T>, double>;

template <class T>
TROPD_HD constexpr scalar_type scalar_type_of() noexcept {
  return std::is_same_v<std::remove_const_t<T>, double> ? scalar_type::f64 : scalar_type::f32;
}

/// One row of a values_matrix (or any tagged pointer): x = row[i].
struct values_row {
  const void* data = nullptr;
  scalar_type type = scalar_type::f32;

  TROPD_HD double operator[](index_t i) const noexcept {
    return type == scalar_type::f64 ? static_cast<const double*>(data)[i] : double(static_cast<const float*>(data)[i]);
  }
  TROPD_HD constexpr bool empty() const noexcept { return data == nullptr; }
};

/// Read-only [size] array of fp32 or fp64 values.
struct values_view {
  const void* data = nullptr;
  index_t size = 0;
  scalar_type type = scalar_type::f32;

  constexpr values_view() = default;
  constexpr values_view(const void* d, index_t n, scalar_type t) noexcept : data(d), size(n), type(t) {}
  /// From a pointer to float or double and a size.
  template <class T>
    requires is_scalar_element<T>
  TROPD_HD constexpr values_view(T* d, index_t n) noexcept : data(d), size(n), type(scalar_type_of<T>()) {}
  /// From a vector_view of float or double (const or not).
  template <class T>
    requires is_scalar_element<T>
  TROPD_HD constexpr values_view(vector_view<T> v) noexcept : data(v.data), size(v.size), type(scalar_type_of<T>()) {}
  /// From a contiguous host container of float or double (std::vector, std::array, std::span).
  template <class C>
    requires requires(const C& c) {
      { c.data() };
      { c.size() };
    } && is_scalar_element<std::remove_pointer_t<decltype(std::declval<const C&>().data())>>
  constexpr values_view(const C& c) noexcept
      : data(c.data()), size(static_cast<index_t>(c.size())),
        type(scalar_type_of<std::remove_pointer_t<decltype(c.data())>>()) {}

  TROPD_HD double operator[](index_t i) const noexcept { return values_row{data, type}[i]; }
  TROPD_HD constexpr bool empty() const noexcept { return size == 0; }
};

/// Read-only [rows x cols] matrix of fp32 or fp64 values with a row stride (elements).
struct values_matrix {
  const void* data = nullptr;
  index_t rows = 0, cols = 0, stride = 0;
  scalar_type type = scalar_type::f32;

  constexpr values_matrix() = default;
  /// From a pointer to float or double, the extents and the row stride (elements).
  template <class T>
    requires is_scalar_element<T>
  TROPD_HD constexpr values_matrix(T* d, index_t r, index_t c, index_t s) noexcept
      : data(d), rows(r), cols(c), stride(s), type(scalar_type_of<T>()) {}
  template <class T>
    requires is_scalar_element<T>
  TROPD_HD constexpr values_matrix(matrix_view<T> m) noexcept
      : data(m.data), rows(m.rows), cols(m.cols), stride(m.stride), type(scalar_type_of<T>()) {}

  TROPD_HD values_row row(index_t r) const noexcept {
    const index_t bytes = type == scalar_type::f64 ? 8 : 4;
    return {static_cast<const char*>(data) + r * stride * bytes, type};
  }
  TROPD_HD double operator()(index_t r, index_t c) const noexcept { return row(r)[c]; }
  TROPD_HD constexpr bool empty() const noexcept { return rows == 0; }
  /// Well formed: non-negative extents, stride covers a row, data for a non-empty view.
  TROPD_HD constexpr bool valid() const noexcept {
    return rows >= 0 && cols >= 0 && stride >= cols && (rows == 0 || cols == 0 || data != nullptr);
  }
};

/// Writable [size] array of fp32 or fp64 values. set() converts; callers check beforehand
/// that every value fits the element type (tropd never writes an overflowed inf).
struct values_out {
  void* data = nullptr;
  index_t size = 0;
  scalar_type type = scalar_type::f32;

  constexpr values_out() = default;
  /// From a pointer to float or double and a size.
  template <class T>
    requires is_scalar_element<T> && (!std::is_const_v<T>)
  TROPD_HD constexpr values_out(T* d, index_t n) noexcept : data(d), size(n), type(scalar_type_of<T>()) {}
  template <class T>
    requires is_scalar_element<T> && (!std::is_const_v<T>)
  TROPD_HD constexpr values_out(vector_view<T> v) noexcept : data(v.data), size(v.size), type(scalar_type_of<T>()) {}
  template <class C>
    requires requires(C& c) {
      { c.data() };
      { c.size() };
    } && is_scalar_element<std::remove_pointer_t<decltype(std::declval<C&>().data())>> &&
             (!std::is_const_v<std::remove_pointer_t<decltype(std::declval<C&>().data())>>)
  constexpr values_out(C& c) noexcept
      : data(c.data()), size(static_cast<index_t>(c.size())), type(scalar_type_of<std::remove_pointer_t<decltype(c.data())>>()) {}

  TROPD_HD void set(index_t i, double x) const noexcept {
    if (type == scalar_type::f64) static_cast<double*>(data)[i] = x;
    else static_cast<float*>(data)[i] = static_cast<float>(x);
  }
  TROPD_HD constexpr bool empty() const noexcept { return size == 0; }
};

/// Writable [rows x cols] matrix of fp32 or fp64 values with a row stride.
struct values_matrix_out {
  void* data = nullptr;
  index_t rows = 0, cols = 0, stride = 0;
  scalar_type type = scalar_type::f32;

  constexpr values_matrix_out() = default;
  template <class T>
    requires is_scalar_element<T> && (!std::is_const_v<T>)
  TROPD_HD constexpr values_matrix_out(T* d, index_t r, index_t c, index_t s) noexcept
      : data(d), rows(r), cols(c), stride(s), type(scalar_type_of<T>()) {}
  template <class T>
    requires is_scalar_element<T> && (!std::is_const_v<T>)
  TROPD_HD constexpr values_matrix_out(matrix_view<T> m) noexcept
      : data(m.data), rows(m.rows), cols(m.cols), stride(m.stride), type(scalar_type_of<T>()) {}

  TROPD_HD void set(index_t r, index_t c, double x) const noexcept {
    if (type == scalar_type::f64) static_cast<double*>(data)[r * stride + c] = x;
    else static_cast<float*>(data)[r * stride + c] = static_cast<float>(x);
  }
  TROPD_HD constexpr bool empty() const noexcept { return rows == 0; }
  TROPD_HD constexpr bool valid() const noexcept {
    return rows >= 0 && cols >= 0 && stride >= cols && (rows == 0 || cols == 0 || data != nullptr);
  }
};

/// Largest finite value of a tagged element type (outputs are checked against it).
TROPD_HD constexpr double max_finite(scalar_type t) noexcept {
  return t == scalar_type::f64 ? 1.7976931348623157e308 : 3.4028234663852886e38;
}

}  // namespace tropd
