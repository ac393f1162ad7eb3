// tropd::gpu::evaluate_tokens for every preset whose objective has no full-vocabulary term (the
// CUDA twin of tokens.cpp).
#include <tropd/gpu/objective.cuh>

#include "gpu_impl.hpp"

namespace tropd_py::gpu::detail {

tropd::status tokens(const objective_spec& spec, const tokens_call& c, void* scratch, size_t scratch_bytes, uintptr_t stream,
                     const device_results& res, std::string* error, size_t* bytes_only) {
  namespace tg = tropd::gpu;
  tg::eval_options opt;
  opt.seed = c.opt.seed;
  opt.step = c.opt.step;
  opt.bad_input = c.opt.bad_input;
  unsigned char* const base = static_cast<unsigned char*>(scratch);
  tropd::token_outputs out = c.out;
  out.loss = base != nullptr ? reinterpret_cast<double*>(base + binding_layout::loss) : nullptr;
  out.diag = base != nullptr ? reinterpret_cast<tropd::diagnostics*>(base + binding_layout::diag) : nullptr;
  return visit_objective(spec, c.normaliser, error, [&](const auto& obj) -> tropd::status {
    using Obj = std::decay_t<decltype(obj)>;
    if constexpr (Obj::has_dense) {
      return tropd::make_error(tropd::errc::unsupported, needs_logits);
    } else {
      TROPD_TRY(check_device_limits(c.batch.size(), 0, c.batch.topk_ids.cols));
      binding_layout L;
      L.lib_bytes = tg::evaluate_tokens_scratch_bytes(obj, c.batch, out, opt);
      if (bytes_only) {
        *bytes_only = L.total();
        return {};
      }
      if (scratch == nullptr || scratch_bytes < L.total())
        return tropd::make_error(tropd::errc::insufficient_scratch, "the scratch tensor is smaller than the scratch-size query asked for");
      const tg::device_context ctx{base + binding_layout::lib, L.lib_bytes, reinterpret_cast<cudaStream_t>(stream)};
      TROPD_TRY(tg::evaluate_tokens(ctx, obj, c.batch, out, opt));
      return finish(scratch, stream, res);
    }
  });
}

}  // namespace tropd_py::gpu::detail
