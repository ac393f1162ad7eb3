// tropd/dist/mpi.hpp: the MPI adapter of dist::communicator (host buffers).
//
//   tropd::dist::mpi_communicator tp{tensor_parallel_comm};   // the caller's MPI_Comm
//
// Wraps a communicator the caller created and still owns (tropd never calls MPI_Init,
// MPI_Comm_split or MPI_Comm_free). Only this header includes <mpi.h>: include it from the
// translation units that use it and link MPI there (CMake: find_package(MPI), MPI::MPI_CXX).
// Errors: a failing MPI call gives errc::backend_error, provided the communicator's error
// handler returns (MPI's default, MPI_ERRORS_ARE_FATAL, aborts the job first). Counts above
// INT_MAX bytes are sent as derived datatypes of 1 MiB blocks plus a remainder.
//
// Where <mpi.h> is not on the include path this header defines nothing but
// TROPD_HAS_MPI = 0 (so that every tropd header compiles alone anywhere); with MPI it is 1.
#pragma once

#if !__has_include(<mpi.h>)
#define TROPD_HAS_MPI 0
#else
#define TROPD_HAS_MPI 1

#include <mpi.h>

#include <limits.h>
#include <stddef.h>

#include <tropd/core/status.hpp>
#include <tropd/dist/communicator.hpp>

namespace tropd::dist {

struct mpi_communicator {
  MPI_Comm comm = MPI_COMM_WORLD;

  static constexpr memory_space space = memory_space::host;

  int rank() const noexcept {
    int r = 0;
    MPI_Comm_rank(comm, &r);
    return r;
  }
  int size() const noexcept {
    int s = 1;
    MPI_Comm_size(comm, &s);
    return s;
  }

  status all_gather(const void* send, void* recv, size_t bytes) noexcept {
    if (bytes <= size_t(INT_MAX)) {
      if (MPI_Allgather(send, int(bytes), MPI_BYTE, recv, int(bytes), MPI_BYTE, comm) != MPI_SUCCESS)
        return make_error(errc::backend_error, "MPI_Allgather failed");
      return {};
    }
    // Large contributions: a contiguous type of 1 MiB blocks, then the remainder, each gathered
    // with a receive type whose extent is one rank's whole contribution.
    constexpr size_t block = size_t(1) << 20;
    const size_t blocks = bytes / block, rest = bytes % block;
    if (blocks > size_t(INT_MAX)) return make_error(errc::unsupported, "mpi_communicator: all_gather contribution too large");
    MPI_Datatype part = MPI_DATATYPE_NULL, slot = MPI_DATATYPE_NULL;
    bool ok = MPI_Type_contiguous(int(block), MPI_BYTE, &part) == MPI_SUCCESS && MPI_Type_commit(&part) == MPI_SUCCESS;
    // One rank's slot in recv: `blocks` blocks, resized to the contribution's full extent.
    MPI_Datatype tmp = MPI_DATATYPE_NULL;
    ok = ok && MPI_Type_contiguous(int(blocks), part, &tmp) == MPI_SUCCESS &&
         MPI_Type_create_resized(tmp, 0, MPI_Aint(bytes), &slot) == MPI_SUCCESS && MPI_Type_commit(&slot) == MPI_SUCCESS;
    ok = ok && MPI_Allgather(send, int(blocks), part, recv, 1, slot, comm) == MPI_SUCCESS;
    if (ok && rest) {
      MPI_Datatype tail = MPI_DATATYPE_NULL, tmp2 = MPI_DATATYPE_NULL;
      ok = MPI_Type_contiguous(int(rest), MPI_BYTE, &tmp2) == MPI_SUCCESS &&
           MPI_Type_create_resized(tmp2, 0, MPI_Aint(bytes), &tail) == MPI_SUCCESS && MPI_Type_commit(&tail) == MPI_SUCCESS &&
           MPI_Allgather(static_cast<const char*>(send) + blocks * block, int(rest), MPI_BYTE,
                         static_cast<char*>(recv) + blocks * block, 1, tail, comm) == MPI_SUCCESS;
      if (tmp2 != MPI_DATATYPE_NULL) MPI_Type_free(&tmp2);
      if (tail != MPI_DATATYPE_NULL) MPI_Type_free(&tail);
    }
    if (tmp != MPI_DATATYPE_NULL) MPI_Type_free(&tmp);
    if (slot != MPI_DATATYPE_NULL) MPI_Type_free(&slot);
    if (part != MPI_DATATYPE_NULL) MPI_Type_free(&part);
    if (!ok) return make_error(errc::backend_error, "MPI_Allgather of a large contribution failed");
    return {};
  }

  status all_reduce(const void* send, void* recv, size_t count, element e, reduce_op op) noexcept {
    if (count > size_t(INT_MAX)) return make_error(errc::unsupported, "mpi_communicator: all_reduce count above INT_MAX");
    const MPI_Datatype t = e == element::f64   ? MPI_DOUBLE
                           : e == element::f32 ? MPI_FLOAT
                           : e == element::i64 ? MPI_INT64_T
                           : e == element::i32 ? MPI_INT32_T
                                               : MPI_UINT8_T;
    const MPI_Op o = op == reduce_op::sum ? MPI_SUM : (op == reduce_op::max ? MPI_MAX : MPI_MIN);
    const void* s = send == recv ? MPI_IN_PLACE : send;
    if (MPI_Allreduce(s, recv, int(count), t, o, comm) != MPI_SUCCESS) return make_error(errc::backend_error, "MPI_Allreduce failed");
    return {};
  }
};
static_assert(host_communicator<mpi_communicator>);

}  // namespace tropd::dist

#endif  // __has_include(<mpi.h>)
