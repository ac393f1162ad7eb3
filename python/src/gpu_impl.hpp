// python/src/gpu_impl.hpp: what the CUDA dispatch's translation units share (plain C++ on the
// host side, no CUDA types): the binding's part of the scratch, the end of a call, the device
// limits and one function per student logits dtype (gpu_rows_<dtype>.cu, compiled in
// parallel like rows_<dtype>.cpp), plus the token level (gpu_tokens.cu).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>

#include <tropd/objective/diagnostics.hpp>

#include "gpu.hpp"

namespace tropd_py::gpu::detail {

/// The caller's scratch: the binding's values first (the call's tropd::diagnostics and its loss,
/// which the library writes there and finish() converts), then, from `lib` (256-byte aligned,
/// as the library wants its scratch), the library's scratch with its status word first.
struct binding_layout {
  static constexpr size_t diag = 0;    ///< offset of the tropd::diagnostics
  static constexpr size_t loss = 256 - sizeof(double);  ///< offset of the loss (double)
  static constexpr size_t lib = 256;   ///< offset of the library's scratch
  size_t lib_bytes = 0;                ///< the library's *_scratch_bytes
  size_t total() const noexcept { return lib + lib_bytes; }
};
static_assert(sizeof(tropd::diagnostics) <= binding_layout::loss && binding_layout::loss % alignof(double) == 0);

/// Refuses sizes beyond the device backend's limits (plan.hpp) as not implemented here (the
/// host backend takes them): rows, vocabulary (0: not a row-level call) and top-k width.
tropd::status check_device_limits(int64_t rows, int64_t vocab, int64_t topk) noexcept;

/// After a call that launched (st ok): converts the diagnostics and loss in the scratch into
/// the caller's tensors on the stream, then reads the status word back (synchronises the
/// stream: the call's one sync) and returns the device checks' status.
tropd::status finish(void* scratch, uintptr_t stream, const device_results& res);

/// One call: bytes_only non-null: only the scratch size (nothing launched).
using rows_fn = tropd::status (*)(const objective_spec&, const rows_call&, void*, size_t, uintptr_t, const device_results&,
                                  std::string*, size_t* bytes_only);
tropd::status rows_f32(const objective_spec&, const rows_call&, void*, size_t, uintptr_t, const device_results&, std::string*,
                       size_t*);
tropd::status rows_f64(const objective_spec&, const rows_call&, void*, size_t, uintptr_t, const device_results&, std::string*,
                       size_t*);
tropd::status rows_bf16(const objective_spec&, const rows_call&, void*, size_t, uintptr_t, const device_results&, std::string*,
                        size_t*);
tropd::status rows_f16(const objective_spec&, const rows_call&, void*, size_t, uintptr_t, const device_results&, std::string*,
                       size_t*);
tropd::status tokens(const objective_spec&, const tokens_call&, void*, size_t, uintptr_t, const device_results&, std::string*,
                     size_t*);

}  // namespace tropd_py::gpu::detail
