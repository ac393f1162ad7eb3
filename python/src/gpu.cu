// The extension's CUDA dispatch (TROPD_PYTHON_CUDA=ON; nvcc, C++20). See gpu.hpp.
//
// The thin second dispatch of the binding: the call structs (calls.hpp) hold device pointers
// here, `scratch` is caller memory from torch's caching allocator and `stream` is torch's
// current stream. The objective calls themselves are in gpu_rows_<dtype>.cu and gpu_tokens.cu
// (tropd::gpu::evaluate_rows / evaluate_tokens); this file holds what they share: the device
// limits, the conversion of the diagnostics and loss into the caller's tensors, and the
// status word's read-back.
#include <cuda_runtime.h>

#include <tropd/gpu/status_word.cuh>

#include "gpu_impl.hpp"
#include "stats.hpp"

#if !defined(__CUDACC__)
#error "python/src/gpu.cu must be compiled by nvcc"
#endif

namespace tropd_py::gpu {

namespace {

constexpr const char* too_many_rows =
    "the CUDA path takes at most 2^28 - 2 rows (tokens) per call (tropd::gpu::max_rows): split the batch, or use CPU tensors";
constexpr const char* vocab_too_large =
    "the CUDA path takes a vocabulary of at most 2^21 - 2 columns (tropd::gpu::max_cols): use CPU tensors";
constexpr const char* topk_too_wide =
    "the CUDA path takes top-k lists of at most 1024 entries (tropd::gpu::max_topk): use a smaller k, or CPU tensors";

/// The caller's loss and stats from the call's diagnostics and loss (one thread: 28 values).
__global__ void write_results_kernel(const tropd::diagnostics* diag, const double* loss, void* out_loss, bool loss_f64, double* stats) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  if (loss_f64) *static_cast<double*>(out_loss) = *loss;
  else *static_cast<float*>(out_loss) = float(*loss);
  write_stats(*diag, stats);
}

}  // namespace

bool compiled() noexcept { return true; }

bool not_implemented(const tropd::status& st) noexcept {
  return st.code == tropd::errc::unsupported &&
         (st.detail == not_bound || st.detail == too_many_rows || st.detail == vocab_too_large || st.detail == topk_too_wide);
}

namespace detail {

tropd::status check_device_limits(int64_t rows, int64_t vocab, int64_t topk) noexcept {
  if (rows > tropd::gpu::max_rows) return tropd::make_error(tropd::errc::unsupported, too_many_rows);
  if (vocab > tropd::gpu::max_cols) return tropd::make_error(tropd::errc::unsupported, vocab_too_large);
  if (topk > tropd::gpu::max_topk) return tropd::make_error(tropd::errc::unsupported, topk_too_wide);
  return {};
}

tropd::status finish(void* scratch, uintptr_t stream, const device_results& res) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned char* base = static_cast<const unsigned char*>(scratch);
  // Written whatever the status: a failed call's outputs are the library's poison (NaN), and
  // the caller raises before returning them.
  write_results_kernel<<<1, 32, 0, s>>>(reinterpret_cast<const tropd::diagnostics*>(base + binding_layout::diag),
                                        reinterpret_cast<const double*>(base + binding_layout::loss), res.loss, res.loss_f64,
                                        res.stats);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return tropd::make_error(tropd::errc::backend_error, cudaGetErrorString(e));
  // The status word of the call (the first 8 bytes of the library's scratch). Reading it is
  // the one synchronisation of a call: the error must raise from the call that made it.
  return tropd::gpu::read_status(base + binding_layout::lib, s);
}

}  // namespace detail

namespace {

tropd::status check_stream(uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  unsigned int flags = 0;
  if (s != nullptr && cudaStreamGetFlags(s, &flags) != cudaSuccess)
    return tropd::make_error(tropd::errc::backend_error, "the CUDA stream handle passed by the caller is not valid");
  return {};
}

detail::rows_fn rows_of(logit_type t) noexcept {
  switch (t) {
    case logit_type::f32: return detail::rows_f32;
    case logit_type::f64: return detail::rows_f64;
    case logit_type::bf16: return detail::rows_bf16;
    case logit_type::f16: return detail::rows_f16;
  }
  return nullptr;
}

tropd::status unknown_type() { return tropd::make_error(tropd::errc::invalid_parameter, "unknown logits element type"); }

}  // namespace

tropd::status rows_scratch_bytes(const objective_spec& spec, const rows_call& c, size_t* bytes, std::string* error) {
  *bytes = 0;
  const detail::rows_fn f = rows_of(c.student.type);
  if (f == nullptr) return unknown_type();
  return f(spec, c, nullptr, 0, 0, device_results{}, error, bytes);
}

tropd::status tokens_scratch_bytes(const objective_spec& spec, const tokens_call& c, size_t* bytes, std::string* error) {
  *bytes = 0;
  return detail::tokens(spec, c, nullptr, 0, 0, device_results{}, error, bytes);
}

tropd::status rows(const objective_spec& spec, const rows_call& c, void* scratch, size_t scratch_bytes, uintptr_t stream,
                   const device_results& res, std::string* error) {
  TROPD_TRY(check_stream(stream));
  const detail::rows_fn f = rows_of(c.student.type);
  if (f == nullptr) return unknown_type();
  return f(spec, c, scratch, scratch_bytes, stream, res, error, nullptr);
}

tropd::status tokens(const objective_spec& spec, const tokens_call& c, void* scratch, size_t scratch_bytes, uintptr_t stream,
                     const device_results& res, std::string* error) {
  TROPD_TRY(check_stream(stream));
  return detail::tokens(spec, c, scratch, scratch_bytes, stream, res, error, nullptr);
}

}  // namespace tropd_py::gpu
