// tropd/core/views.hpp: non-owning views over caller memory.
//
//   matrix_view<T>: [rows x cols] with a row stride (elements, >= cols); row r starts at
//                   data + r * stride. Used for [tokens x vocab] logits and [tokens x k] top-k lists.
//   vector_view<T>: [size] contiguous; used for per-token arrays.
//
// Views are trivially copyable aggregates and can be passed to CUDA kernels by value.
// Memory space is the caller's business: the host backend dereferences them on the
// host, the gpu backend on the device.
#pragma once

#include <type_traits>

#include <tropd/config.hpp>

namespace tropd {

template <class T>
struct vector_view {
  T* data = nullptr;
  index_t size = 0;

  TROPD_HD constexpr T& operator[](index_t i) const noexcept { return data[i]; }
  TROPD_HD constexpr bool empty() const noexcept { return size == 0; }
  TROPD_HD constexpr T* begin() const noexcept { return data; }
  TROPD_HD constexpr T* end() const noexcept { return data + size; }
  /// Implicit conversion to a view of const elements (only for views of non-const T; a
  /// template, so no compiler sees a conversion of a const view to its own type).
  template <class U>
    requires(std::is_same_v<U, const T> && !std::is_const_v<T>)
  TROPD_HD constexpr operator vector_view<U>() const noexcept {
    return {data, size};
  }
};

template <class T>
struct matrix_view {
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t stride = 0;  ///< elements between the starts of consecutive rows

  TROPD_HD constexpr T* row(index_t r) const noexcept { return data + r * stride; }
  TROPD_HD constexpr T& operator()(index_t r, index_t c) const noexcept { return data[r * stride + c]; }
  TROPD_HD constexpr bool empty() const noexcept { return rows == 0; }
  /// True when the view is well formed (stride covers a row, non-negative extents, data for non-empty views).
  TROPD_HD constexpr bool valid() const noexcept {
    return rows >= 0 && cols >= 0 && stride >= cols && (rows == 0 || cols == 0 || data != nullptr);
  }
  /// Implicit conversion to a view of const elements (only for views of non-const T).
  template <class U>
    requires(std::is_same_v<U, const T> && !std::is_const_v<T>)
  TROPD_HD constexpr operator matrix_view<U>() const noexcept {
    return {data, rows, cols, stride};
  }
};

/// A contiguous [rows x cols] view (stride = cols unless given).
template <class T>
TROPD_HD constexpr matrix_view<T> make_matrix(T* data, index_t rows, index_t cols, index_t stride = -1) noexcept {
  return {data, rows, cols, stride < 0 ? cols : stride};
}
template <class T>
TROPD_HD constexpr vector_view<T> make_vector(T* data, index_t size) noexcept {
  return {data, size};
}
/// View over a contiguous container with data() and size() (std::vector, std::array, std::span).
template <class C>
constexpr auto view_of(C& c) noexcept -> vector_view<std::remove_reference_t<decltype(*c.data())>> {
  return {c.data(), static_cast<index_t>(c.size())};
}

}  // namespace tropd
