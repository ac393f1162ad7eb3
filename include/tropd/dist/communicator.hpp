// tropd/dist/communicator.hpp: what tropd needs from a communicator, and nothing more.
//
// tropd never creates, owns or destroys a communicator: the integrator passes the one its
// trainer already has (an MPI communicator, an NCCL communicator and its stream, a
// torch.distributed process group through the Python package) wrapped in a small adapter
// that models `communicator`:
//
//   c.rank(), c.size()                        this process's rank in the group, the group's size
//   C::space                                  where the buffers of the collectives live
//                                             (memory_space::host or ::device)
//   c.all_gather(send, recv, bytes)           recv[r * bytes, (r + 1) * bytes) = rank r's send,
//                                             for every rank r of the group, in rank order;
//                                             send and recv do not overlap
//   c.all_reduce(send, recv, count, elem, op) recv[i] = op over ranks of send[i], `count`
//                                             elements of type `elem` (send == recv: in place)
//
// Every call returns a tropd::status (errc::backend_error when the transport fails). A device
// communicator (NCCL) also has c.stream(): its collectives are enqueued there and do not
// synchronise; a host communicator's collectives have completed when they return.
//
// Adapters: dist/mpi.hpp (MPI, host buffers), dist/nccl.cuh (NCCL, device buffers, and a host
// staging wrapper); single_process below (a group of one, for code that is written once for
// any group size). The distributed entry points (dist/rows.hpp) use only all_gather of bytes:
// every rank then merges the same records in the same (rank) order, so all ranks compute
// bit-identical results whatever the transport's reduction order.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <concepts>
#include <cstring>
#include <type_traits>

#include <tropd/config.hpp>
#include <tropd/core/status.hpp>

namespace tropd::dist {

/// Where a communicator's buffers live.
enum class memory_space : uint8_t { host = 0, device = 1 };

/// Element types of typed all-reduces.
enum class element : uint8_t { f64 = 0, f32 = 1, i64 = 2, i32 = 3, u8 = 4 };

/// Reductions of all_reduce.
enum class reduce_op : uint8_t { sum = 0, max = 1, min = 2 };

template <class T>
constexpr element element_of() noexcept {
  static_assert(std::is_same_v<T, double> || std::is_same_v<T, float> || std::is_same_v<T, int64_t> ||
                    std::is_same_v<T, int32_t> || std::is_same_v<T, uint8_t>,
                "tropd::dist: typed collectives take double, float, int64_t, int32_t or uint8_t elements");
  if constexpr (std::is_same_v<T, double>) return element::f64;
  else if constexpr (std::is_same_v<T, float>) return element::f32;
  else if constexpr (std::is_same_v<T, int64_t>) return element::i64;
  else if constexpr (std::is_same_v<T, int32_t>) return element::i32;
  else return element::u8;
}

constexpr size_t element_bytes(element e) noexcept {
  switch (e) {
    case element::f64: case element::i64: return 8;
    case element::f32: case element::i32: return 4;
    case element::u8: return 1;
  }
  return 0;
}

/// The communicator concept (see the header comment).
template <class C>
concept communicator = requires(C& c, const C& cc, const void* send, void* recv, size_t n) {
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  { C::space } -> std::convertible_to<memory_space>;
  { c.all_gather(send, recv, n) } -> std::same_as<status>;
  { c.all_reduce(send, recv, n, element::f64, reduce_op::sum) } -> std::same_as<status>;
};

/// A communicator whose collectives take host memory (what the host backend needs).
template <class C>
concept host_communicator = communicator<C> && (C::space == memory_space::host);

/// A communicator whose collectives take device memory and are enqueued on its stream.
template <class C>
concept device_communicator = communicator<C> && (C::space == memory_space::device) && requires(const C& c) { c.stream(); };

/// Typed all-gather: recv[r * count + i] = rank r's send[i].
template <class T, communicator C>
status all_gather(C& c, const T* send, T* recv, size_t count) {
  static_assert(std::is_trivially_copyable_v<T>, "tropd::dist::all_gather: elements must be trivially copyable");
  return c.all_gather(send, recv, count * sizeof(T));
}

/// Typed all-reduce: recv[i] = op over ranks of send[i] (send == recv: in place).
template <class T, communicator C>
status all_reduce(C& c, const T* send, T* recv, size_t count, reduce_op op) {
  return c.all_reduce(send, recv, count, element_of<T>(), op);
}

/// A group of one process (rank 0 of 1): collectives are copies. For code written once for
/// any group size, and for the tensor or data dimension a run does not shard.
struct single_process {
  static constexpr memory_space space = memory_space::host;
  int rank() const noexcept { return 0; }
  int size() const noexcept { return 1; }
  status all_gather(const void* send, void* recv, size_t bytes) noexcept {
    if (bytes) std::memmove(recv, send, bytes);
    return {};
  }
  status all_reduce(const void* send, void* recv, size_t count, element e, reduce_op) noexcept {
    if (count && send != recv) std::memmove(recv, send, count * element_bytes(e));
    return {};
  }
};
static_assert(host_communicator<single_process>);

}  // namespace tropd::dist
