// tropd/core/fused_lm_head.hpp: what the fused LM head computes, shared by the CPU
// (host/fused_lm_head.hpp) and CUDA (gpu/fused_lm_head.cuh) backends: the linear head and its
// logit transform, the GEMM interface, and how many sweeps an objective takes.
//
// The fused LM head evaluates an objective from the student's hidden states h [n x H] and
// output weight W [V x H] without ever holding [n x V] logits: per chunk of c rows,
//
//   x = h_c W^T + b          [c x V]  one GEMM
//   z = transform(x)                  scale, then the optional soft-cap (Gemma): below
//   row statistics of z (and of the teacher's chunk) -> token stages -> dL/dz (row passes,
//   the same functions as host::evaluate_rows, which reads z / T_S like any logits)
//   dL/dx = dL/dz * transform'(z)
//   dL/dh_c = dL/dx W         [c x H]  GEMM
//   dL/dW  += dL/dx^T h_c     [V x H]  GEMM (skipped for a frozen weight)
//   dL/db  += column sums of dL/dx
//
// One sweep or two. The gradient of a row needs the aggregation weight w_i of its token and the
// region's decision. Where both are known chunk by chunk, one sweep over the chunks does
// everything (three student GEMMs). Where they need the whole batch (a batch quantile, a
// sequence mask, a normaliser that counts kept tokens, input_policy::mask), a statistics sweep
// comes first, then the batch decisions, then a gradient sweep that recomputes each chunk's
// logits (four student GEMMs). fused_sweeps() says which; docs/fused_lm_head.md has the table.
#pragma once

#include <math.h>

#include <concepts>

#include <tropd/aggregation/aggregation.hpp>
#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/views.hpp>
#include <tropd/regions/regions.hpp>

namespace tropd {

/// Arithmetic of logit_transform on scalars (host and device). A backend that applies the
/// transform to packets supplies the same members for its packet type.
template <class F>
struct transform_scalar_ops {
  TROPD_HD static constexpr F set1(F x) noexcept { return x; }
  TROPD_HD static constexpr F add(F x, F y) noexcept { return x + y; }
  TROPD_HD static constexpr F sub(F x, F y) noexcept { return x - y; }
  TROPD_HD static constexpr F mul(F x, F y) noexcept { return x * y; }
  TROPD_HD static F tanh(F x) noexcept {
    if constexpr (sizeof(F) == 4) return ::tanhf(x);
    else return ::tanh(x);
  }
};

/// How a linear head's logits are formed from x = h W^T + b (Gemma-2/3 and Cohere style):
///
///   y = scale * x
///   z = softcap * tanh(y / softcap)    (softcap > 0; 0 = no soft-cap: z = y)
///
/// and dz/dx = scale * (1 - (z / softcap)^2) (scale without the soft-cap). The temperature is
/// applied after this, by the row passes (row_inputs::student_temperature / teacher_temperature),
/// exactly as for logits given to host::evaluate_rows.
struct logit_transform {
  double scale = 1.0;    ///< logit scale (> 0, finite)
  double softcap = 0.0;  ///< soft-cap c (> 0), or 0 for none

  TROPD_HD constexpr bool identity() const noexcept { return scale == 1.0 && softcap == 0.0; }
  TROPD_HD constexpr status check() const noexcept {
    if (!(scale > 0) || !is_finite(scale)) return make_error(errc::invalid_parameter, "logit_transform: scale must be finite and > 0");
    if (!(softcap >= 0) || !is_finite(softcap)) return make_error(errc::invalid_parameter, "logit_transform: softcap must be finite and >= 0 (0: off)");
    return {};
  }
  /// z from x (V: a scalar of type F or a backend's packet of F, Ops its arithmetic).
  template <class Ops, class V, class F>
  TROPD_HD V forward_with(V x) const noexcept {
    const V y = Ops::mul(Ops::set1(F(scale)), x);
    if (softcap == 0.0) return y;
    return Ops::mul(Ops::set1(F(softcap)), Ops::tanh(Ops::mul(y, Ops::set1(F(1.0 / softcap)))));
  }
  /// dz/dx at the output z.
  template <class Ops, class V, class F>
  TROPD_HD V derivative_with(V z) const noexcept {
    if (softcap == 0.0) return Ops::set1(F(scale));
    const V t = Ops::mul(z, Ops::set1(F(1.0 / softcap)));
    return Ops::mul(Ops::set1(F(scale)), Ops::sub(Ops::set1(F(1)), Ops::mul(t, t)));
  }
  template <class F>
  TROPD_HD F forward(F x) const noexcept { return forward_with<transform_scalar_ops<F>, F, F>(x); }
  template <class F>
  TROPD_HD F derivative(F z) const noexcept { return derivative_with<transform_scalar_ops<F>, F, F>(z); }
};

/// A linear LM head: logits z = transform(hidden weight^T + bias), [n x V]. Views of the
/// backend's memory (host memory for host/, device memory for gpu/).
template <class T>
struct linear_head {
  matrix_view<const T> hidden{};  ///< [n x H] hidden states (any row stride)
  matrix_view<const T> weight{};  ///< [V x H] output weight, the layout of nn.Linear(H, V).weight
  vector_view<const T> bias{};    ///< [V] optional bias (empty: none)
  logit_transform transform{};    ///< logit scale and soft-cap
};

/// The shape rules of a head (n = hidden rows, V = weight rows, H = the common columns).
template <class T>
status check_head(const linear_head<T>& h, bool teacher) noexcept {
  if (!h.hidden.valid() || !h.weight.valid())
    return make_error(errc::shape_mismatch, teacher ? "teacher head: hidden or weight view is malformed (stride < cols or null data)"
                                                    : "hidden or weight view is malformed (stride < cols or null data)");
  if (h.hidden.cols != h.weight.cols)
    return make_error(errc::shape_mismatch, teacher ? "teacher head: hidden [n x H_T] and weight [V x H_T] have different H_T"
                                                    : "hidden [n x H] and weight [V x H] have different H (hidden.cols != weight.cols)");
  if (h.hidden.cols < 1) return make_error(errc::shape_mismatch, teacher ? "teacher head: hidden size H_T must be >= 1" : "hidden size H must be >= 1");
  if (h.bias.size != 0 && (h.bias.size != h.weight.rows || h.bias.data == nullptr))
    return make_error(errc::shape_mismatch, teacher ? "teacher head: bias must be empty or have one entry per vocabulary row of the weight"
                                                    : "bias must be empty or have one entry per vocabulary row of the weight [V]");
  return h.transform.check();
}

/// Operation on a GEMM operand: as stored, or transposed.
enum class gemm_op : int { n = 0, t = 1 };

/// The GEMM the fused LM head calls, row-major (BLAS's arguments on row-major storage):
///
///   C[m x n] = alpha op(A)[m x k] op(B)[k x n] + beta C,   ld*: row strides in elements,
///
/// with beta = 0 meaning C is not read. It returns a tropd::status (ok, or backend_error).
/// The host default is host::eigen_gemm, the device one gpu::cublaslt_gemm; an integrator
/// passes their own (a tuned BLAS, a tensor-parallel GEMM) as any object with this call.
/// TA / TB: operand element types, TC: the result's, S: alpha's and beta's.
template <class Gemm, class TA, class TB, class TC, class S>
concept gemm_for = requires(Gemm& g, gemm_op op, index_t i, S s, const TA* a, const TB* b, TC* c) {
  { g(op, op, i, i, i, s, a, i, b, i, s, c, i) } -> std::convertible_to<status>;
};

/// How a fused call goes through the chunks.
enum class sweep_policy : int {
  automatic = 0,  ///< one sweep where the objective allows it (fused_sweeps), else two
  one = 1,        ///< one sweep; errc::unsupported where the objective needs batch decisions
  two = 2,        ///< always two: every row's statistics are computed and checked before
                  ///< anything is written (a failed call leaves the outputs untouched)
};

/// Whether an objective can take one sweep at all (compile time): its region decides each
/// token alone (regions::decides_per_token; not a batch quantile or a sequence mask).
template <class Obj>
inline constexpr bool fused_one_sweep_capable = regions::decides_per_token<typename Obj::region_type>;

/// The sweeps an objective takes under sweep_policy::automatic: 1 where its region decides
/// per token, its aggregation weights follow from the origin tags (any mode but a mean over
/// kept tokens, which an external normaliser also makes one sweep) and bad input is
/// rejected (input_policy::mask turns tokens into prompt tokens as their values are read);
/// else 2.
template <class Obj>
constexpr int fused_sweeps(const Obj& obj, bool mask_bad_input) noexcept {
  if (!fused_one_sweep_capable<Obj> || mask_bad_input) return 2;
  if (obj.agg.how == aggregation::mode::kept_token_mean && !(obj.agg.normaliser > 0)) return 2;
  return 1;
}

}  // namespace tropd
