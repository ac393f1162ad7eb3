// fuzz/target_rows.hpp: the row pass of every full-vocabulary estimator and every sampled
// (estimator, usage) pair, host::divergence_rows and host::sampled_rows, against the naive
// long-double reference (tests/reference/naive.hpp) or a documented error.
//
// Decoded case: estimator, rows N in [1, 8], vocabulary V in [1, 64], student and teacher
// element types (8 pairs), gradient type, temperatures and JSD beta (in and out of domain),
// grad_scale, threads 1-3, fused order, sampled ids (also out of range), s_old, an optional
// shape fault, then one byte per logit (grids of several scales and offsets; -inf masks;
// NaN/+inf/extremes from real input bytes).
//
// Rules checked (docs/robustness.md):
//   * parameters outside their domain -> invalid_parameter; shape faults -> shape_mismatch /
//     empty_batch; non-finite grad_scale / s_old -> non_finite_input (row); ids outside [0, V)
//     -> id_out_of_range (row, id);
//   * the first failing row, in row order: NaN/+inf logit -> non_finite_input (row, column,
//     student before teacher); a finite logit whose scaled value x / T overflows the work
//     type (fp32 for fp32/bf16/fp16 inputs, fp64 with an fp64 input) -> unsupported (row,
//     column), whichever comes first; a row of -inf -> no_finite_entry; an infinite
//     divergence (support rule, in every work type: reverse KL where a finite student logit
//     meets a -inf teacher logit, forward KL the other way round) -> infinite_divergence;
//     a sampled token with -inf student or teacher logit, or an estimator that overflows
//     double -> infinite_divergence (row, id);
//   * output checks: a gradient that does not fit G (or whose grad_scale / T_S * coefficient
//     overflows the work type), or a loss that does not fit double -> infinite_divergence
//     (row, first non-finite column); required where the reference is clearly beyond the
//     range, accepted (as is a correct finite result) near its edge;
//   * near the work type's range (scaled logits or their spread): infinite_divergence or
//     no_finite_entry, or a finite result within the input's precision;
//   * otherwise loss and gradient within a tolerance derived from the work type's epsilon,
//     the vocabulary size and the magnitude of the logits that carry mass;
//   * an ok status with a non-finite loss or gradient entry is always a failure;
//   * a first-pass error leaves every output bit-identical to its poison (fused: losses
//     untouched, gradient rows after the failing one untouched); an output-check error leaves
//     the losses untouched (gradient rows may be partly written); a successful call
//     overwrites every output with a finite value.
//   * a finite logit whose scaled value leaves the range (to +inf or -inf) is unsupported
//     (R3: -inf is not taken for a mask); in the non-fused order a first-pass error of any row
//     comes before an earlier row's output-check error (D2, documented; common.hpp).
#pragma once

#include "judge.hpp"
#include "reference/naive.hpp"

namespace tropd_fuzz::rows {

namespace est = tropd::estimators;
namespace naive = tropd_test::naive;

enum est_id : int { e_rkl, e_fkl, e_jsd, e_tv, e_k1_pg, e_k2_loss, e_k3_loss, e_k2_pg, e_k3_pg, n_est };
inline const char* est_name(int e) {
  static const char* names[] = {"reverse_kl", "forward_kl", "jsd", "total_variation", "k1 pg_reward",
                                "k2 loss",    "k3 loss",    "k2 pg_reward", "k3 pg_reward"};
  return names[e];
}
inline bool is_sampled(int e) { return e >= e_k1_pg; }

enum fault : int { f_none = 0, f_loss_size, f_grad_cols, f_gscale_size, f_teacher_rows, f_teacher_cols, f_student_stride, f_ids_size, f_empty, n_fault };

struct cfg {
  int est = 0;
  int N = 1, V = 1;
  ety ts = ety::f32, tt = ety::f32;
  bool grad_double = false, want_grad = true;
  double Ts = 1, Tt = 1, beta = 0.5;
  int threads = 1;
  bool fused = false;
  int fault = f_none;
  std::vector<double> gscale;   // empty or N
  std::vector<int32_t> ids;     // N (sampled)
  bool has_s_old = false;
  std::vector<double> s_old_delta;  // N: s_old = s + delta (or a special)
  value_cfg vs, vt;

  std::string describe() const {
    std::string s = cat("rows: est=", est_name(est), " N=", N, " V=", V, " TS=", ety_name(ts), " TT=", ety_name(tt),
                        " G=", grad_double ? "f64" : "f32", " grad=", want_grad, " Ts=", Ts, " Tt=", Tt, " beta=", beta,
                        " threads=", threads, " fused=", fused, " fault=", fault, " student{scale=", vs.scale,
                        " offset=", vs.offset, " -inf=", vs.neg_inf, " specials=", vs.specials, "} teacher{scale=", vt.scale,
                        " offset=", vt.offset, " -inf=", vt.neg_inf, " specials=", vt.specials, "}");
    if (!gscale.empty()) {
      s += " grad_scale=[";
      for (double g : gscale) s += cat(g, " ");
      s += "]";
    }
    if (is_sampled(est)) {
      s += " ids=[";
      for (int32_t i : ids) s += cat(i, " ");
      s += "]";
      if (has_s_old) {
        s += " s_old-s=[";
        for (double d : s_old_delta) s += cat(d, " ");
        s += "]";
      }
    }
    return s;
  }
};

inline naive::est sampled_est(int e) {
  return (e == e_k1_pg) ? naive::est::k1 : (e == e_k2_loss || e == e_k2_pg) ? naive::est::k2 : naive::est::k3;
}
inline naive::usage sampled_usage(int e) {
  return (e == e_k2_loss || e == e_k3_loss) ? naive::usage::loss : naive::usage::pg_reward;
}

/// K4 / R2 (fixed): a gradient that does not fit the output type G, or whose intermediate
/// (grad_scale / T_S) * coefficient does not fit the work type, is an output-check error
/// (judge.hpp, expect_gradient_overflow). `coef`: the largest intermediate besides the gradient.
inline void gradient_overflow(row_expect& e, ld scale, int r, ld maxG, ld maxW, ld coef = 0) {
  const ld lim = std::min(maxG, maxW);
  ld gmax = 0;
  for (ld g : e.grad) gmax = std::isnan(g) ? ldinf : std::max(gmax, std::fabs(g));
  if (!(gmax <= lim / 2) || !(coef <= lim / 2) || std::fabs(scale) > maxW / 2) {
    expect_gradient_overflow(e, r, lim);
    if (!std::isfinite(gmax)) e.check_grad = false;
  }
}

template <class TS, class TT, class G, bool Full = true>
void run(const cfg& c, input& in) {
  using W = std::conditional_t<std::is_same_v<TS, double> || std::is_same_v<TT, double>, double, float>;
  const int N = c.N, V = c.V;
  const ld epsW = work_eps<TS, TT>(), maxW = work_max<TS, TT>(), minW = work_min_normal<TS, TT>();
  const ld epsG = std::numeric_limits<G>::epsilon(), maxG = std::numeric_limits<G>::max();
  const ld minG = std::numeric_limits<G>::min();  // below it the output type flushes or loses digits
  value_cfg vs = c.vs, vt = c.vt;
  vs.type_max = max_finite<TS>();
  vt.type_max = max_finite<TT>();

  // Data (a fault may ask for extra rows / columns / stride).
  const int t_rows = c.fault == f_teacher_rows ? N + 1 : N;
  const int t_cols = c.fault == f_teacher_cols ? V + 1 : V;
  std::vector<TS> zs(static_cast<size_t>(N * V));
  std::vector<TT> zt(static_cast<size_t>(t_rows * t_cols));
  for (auto& x : zs) x = store<TS>(element(in, vs));
  for (auto& x : zt) x = store<TT>(element(in, vt));
  auto zval = [&](int r, int v) { return value_of(zs[static_cast<size_t>(r * V + v)]); };
  auto uval = [&](int r, int v) { return value_of(zt[static_cast<size_t>(r * t_cols + v)]); };

  // Outputs, poisoned.
  const int g_cols = c.fault == f_grad_cols ? V + 1 : V;
  std::vector<double> loss(static_cast<size_t>(N + 1), poison<double>());
  std::vector<G> grad(c.want_grad ? static_cast<size_t>(N * g_cols) : 0, poison<G>());
  const index_t loss_n = c.fault == f_empty ? 0 : (c.fault == f_loss_size ? N - 1 : N);
  const index_t rows_n = c.fault == f_empty ? 0 : N;
  const index_t stride = c.fault == f_student_stride ? V - 1 : V;
  std::vector<double> gsv = c.gscale;
  if (c.fault == f_gscale_size) gsv.assign(static_cast<size_t>(N + 1), 1.0);
  std::vector<int32_t> idv = c.ids;
  if (c.fault == f_ids_size && is_sampled(c.est)) idv.resize(static_cast<size_t>(N - 1));

  tropd::host::row_options opt;
  opt.student_temperature = c.Ts;
  opt.teacher_temperature = c.Tt;
  opt.threads = c.threads;
  opt.order = c.fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;

  // Reference log-softmaxes per row (only meaningful for rows without NaN/+inf).
  std::vector<std::vector<ld>> ls(static_cast<size_t>(N)), lt(static_cast<size_t>(N));
  std::vector<ld> lse_s(static_cast<size_t>(N)), lse_t(static_cast<size_t>(N));
  std::vector<std::vector<ld>> zrow(static_cast<size_t>(N)), urow(static_cast<size_t>(N));
  for (int r = 0; r < N; ++r) {
    for (int v = 0; v < V; ++v) {
      zrow[static_cast<size_t>(r)].push_back(zval(r, v));
      urow[static_cast<size_t>(r)].push_back(uval(r, v));
    }
  }

  // s_old values: s + delta where s is defined (set below), the delta itself otherwise.
  std::vector<double> s_old(c.has_s_old ? c.s_old_delta : std::vector<double>{});

  // ---- The expected global (pre-row) error, in the library's documented check order.
  std::vector<error_outcome> global;
  auto T_ok = [](double T) { return T > 0 && std::isfinite(T); };
  const bool beta_ok = !(c.est == e_jsd) || (c.beta >= 0 && c.beta <= 1);
  if (!beta_ok) global.push_back({errc::invalid_parameter, -1, -1, ""});
  else if (!T_ok(c.Ts) || !T_ok(c.Tt)) global.push_back({errc::invalid_parameter, -1, -1, ""});
  else if (c.fault == f_student_stride) global.push_back({errc::shape_mismatch, -1, -1, ""});
  else if (c.fault == f_empty) global.push_back({errc::empty_batch, -1, -1, ""});
  else if (c.fault == f_loss_size) global.push_back({errc::shape_mismatch, -1, -1, ""});
  else if (c.fault == f_grad_cols && c.want_grad) global.push_back({errc::shape_mismatch, -1, -1, ""});
  else if (c.fault == f_gscale_size) global.push_back({errc::shape_mismatch, -1, -1, ""});
  else {
    for (int r = 0; r < static_cast<int>(gsv.size()) && global.empty(); ++r)
      if (!std::isfinite(gsv[static_cast<size_t>(r)])) global.push_back({errc::non_finite_input, r, -1, ""});
    if (global.empty() && (c.fault == f_teacher_rows || c.fault == f_teacher_cols))
      global.push_back({errc::shape_mismatch, -1, -1, ""});
    if (global.empty() && is_sampled(c.est)) {
      if (c.fault == f_ids_size) global.push_back({errc::shape_mismatch, -1, -1, ""});
      for (int r = 0; r < N && global.empty(); ++r)
        if (idv[static_cast<size_t>(r)] < 0 || idv[static_cast<size_t>(r)] >= V)
          global.push_back({errc::id_out_of_range, r, idv[static_cast<size_t>(r)], ""});
      for (int r = 0; r < static_cast<int>(s_old.size()) && global.empty(); ++r)
        if (!std::isfinite(s_old[static_cast<size_t>(r)])) global.push_back({errc::non_finite_input, r, -1, ""});
    }
  }

  // ---- Per-row expectations.
  std::vector<row_expect> rx(static_cast<size_t>(N));
  const bool sampled = is_sampled(c.est);
  for (int r = 0; r < N && global.empty(); ++r) {
    row_expect& e = rx[static_cast<size_t>(r)];
    const auto& z = zrow[static_cast<size_t>(r)];
    const auto& u = urow[static_cast<size_t>(r)];
    // First-pass rejection (R1 rule): per row the student, then the teacher; the first NaN /
    // +inf input (non_finite_input) or finite input that overflows once scaled (unsupported).
    {
      stage_fault f = first_stage_fault<W>(z, c.Ts);
      if (f.col < 0) f = first_stage_fault<W>(u, c.Tt);
      if (f.col >= 0) {
        e.errors.push_back({f.code, r, f.col, ""});
        e.value_ok = false;
        e.strict = true;
        continue;
      }
    }
    // Range zone: a finite scaled logit near the work type's limit, or a spread of the scaled
    // logits that leaves half its range. The first pass's sums, the loss or the gradient may
    // then not fit: infinite_divergence / no_finite_entry, or a finite result compared with a
    // tolerance as wide as the input's precision.
    bool range = false;
    {
      ld amax = -ldinf, amin = ldinf, bmax = -ldinf, bmin = ldinf;
      for (int v = 0; v < V; ++v) {
        const ld a = z[static_cast<size_t>(v)] / c.Ts, b = u[static_cast<size_t>(v)] / c.Tt;
        if (std::isfinite(z[static_cast<size_t>(v)])) {
          if (std::fabs(a) > maxW / 2) range = true;
          amax = std::max(amax, a);
          amin = std::min(amin, a);
        }
        if (std::isfinite(u[static_cast<size_t>(v)])) {
          if (std::fabs(b) > maxW / 2) range = true;
          bmax = std::max(bmax, b);
          bmin = std::min(bmin, b);
        }
      }
      // The first pass accumulates sum_v w_v ((a_v - max a) - (b_v - max b)) over up to V
      // weights w_v <= 1: it overflows when V times the spreads leave the range.
      const ld sa = amax > amin ? amax - amin : 0, sb = bmax > bmin ? bmax - bmin : 0;
      if ((sa + sb) * (V + 1) > maxW / 2) range = true;
    }
    e.range = range;
    // B8: Eigen's vectorised exp clamps very negative arguments to a tiny positive result
    // instead of 0; the first-pass sums multiply it by (a - max a), which is ~1e308 for a
    // logit like -DBL_MAX (finfo.min used as a mask): an O(1) error in KL and entropy.
    for (int v = 0; v < V; ++v)
      for (ld x : {z[static_cast<size_t>(v)] / c.Ts, u[static_cast<size_t>(v)] / c.Tt})
        if (std::isfinite(x) && std::fabs(x) > (std::is_same_v<W, double> ? 1e300L : 1e36L)) e.huge = true;
    if (range)
      for (errc k : {errc::no_finite_entry, errc::infinite_divergence}) e.late.push_back({k, r, any_pos, ""});
    auto all_neg_inf = [&](const std::vector<ld>& x) {
      for (ld v : x)
        if (v != -ldinf) return false;
      return true;
    };
    if (all_neg_inf(z) || all_neg_inf(u)) {
      e.errors.push_back({errc::no_finite_entry, r, -1, ""});
      e.value_ok = false;
      e.strict = true;
      continue;
    }
    auto& lsr = ls[static_cast<size_t>(r)];
    auto& ltr = lt[static_cast<size_t>(r)];
    lsr = log_softmax(z, c.Ts, &lse_s[static_cast<size_t>(r)]);
    ltr = log_softmax(u, c.Tt, &lse_t[static_cast<size_t>(r)]);
    const ld gs = c.gscale.empty() ? 1 : c.gscale[static_cast<size_t>(r)];
    const ld scale = gs / c.Ts;
    // Per-entry relative errors of p and q in the work type.
    std::vector<ld> p(static_cast<size_t>(V)), q(static_cast<size_t>(V)), relp(static_cast<size_t>(V)), relq(static_cast<size_t>(V));
    ld amax = -ldinf, bmax = -ldinf;
    for (int v = 0; v < V; ++v) {
      amax = std::max(amax, z[static_cast<size_t>(v)] / c.Ts);
      bmax = std::max(bmax, u[static_cast<size_t>(v)] / c.Tt);
    }
    for (int v = 0; v < V; ++v) {
      const size_t i = static_cast<size_t>(v);
      p[i] = lsr[i] == -ldinf ? 0 : std::exp(lsr[i]);
      q[i] = ltr[i] == -ldinf ? 0 : std::exp(ltr[i]);
      const ld a = z[i] == -ldinf ? 0 : std::fabs(z[i] / c.Ts), b = u[i] == -ldinf ? 0 : std::fabs(u[i] / c.Tt);
      relp[i] = 4 * epsW * (V + 8 + a + std::fabs(amax) + std::fabs(lse_s[static_cast<size_t>(r)]));
      relq[i] = 4 * epsW * (V + 8 + b + std::fabs(bmax) + std::fabs(lse_t[static_cast<size_t>(r)]));
    }
    e.grad.assign(static_cast<size_t>(V), 0);
    e.grad_tol.assign(static_cast<size_t>(V), 0);
    // Absolute error floor of a probability: Eigen's vectorised exp clamps its argument, so a
    // probability that is 0 may come back as ~e^-680 (double) or ~e^-88 (float).
    const ld floor_abs = std::is_same_v<W, double> ? 1e-290L : 64 * minW;

    if (!sampled) {
      // Support rule: reverse KL is infinite where a finite student logit meets a -inf teacher
      // logit, forward KL the other way round.
      const bool need_r = c.est == e_rkl || (c.est == e_jsd && c.beta >= 1);
      const bool need_f = c.est == e_fkl || (c.est == e_jsd && c.beta <= 0);
      // (K1, fixed: the decision follows the supports in every work type, not exp underflow.)
      bool inf_r = false, inf_f = false;
      for (int v = 0; v < V; ++v) {
        const size_t i = static_cast<size_t>(v);
        if (need_r && std::isfinite(z[i]) && u[i] == -ldinf) inf_r = true;
        if (need_f && std::isfinite(u[i]) && z[i] == -ldinf) inf_f = true;
      }
      if (inf_r || inf_f) {
        e.errors.push_back({errc::infinite_divergence, r, -1, ""});
        e.value_ok = false;
        e.strict = true;
        continue;
      }
      naive::value_grad ref;
      switch (c.est) {
        case e_rkl: ref = naive::reverse_kl(z, u, c.Ts, c.Tt); break;
        case e_fkl: ref = naive::forward_kl(z, u, c.Ts, c.Tt); break;
        case e_jsd: ref = naive::jsd(z, u, c.beta, c.Ts, c.Tt); break;
        default: ref = naive::total_variation(z, u, c.Ts, c.Tt); break;
      }
      if (!std::isfinite(ref.value)) {  // (should not happen after the support rule)
        e.late.push_back({errc::infinite_divergence, r, any_pos, ""});
        e.value_ok = false;
        continue;
      }
      e.loss = ref.value;
      e.has_ref = true;
      // A loss at the edge of double's range (R2, fixed): infinite_divergence, never an ok
      // status with a non-finite loss.
      if (!(std::fabs(ref.value) <= std::numeric_limits<double>::max() / 4)) e.late.push_back({errc::infinite_divergence, r, any_pos, ""});
      ld jsd_extra = 0;
      if (c.est == e_jsd && c.beta > 0 && c.beta < 1)
        jsd_extra = std::fabs(std::log(static_cast<ld>(c.beta))) + std::fabs(std::log1p(-static_cast<ld>(c.beta)));
      ld tv = 0;
      for (int v = 0; v < V; ++v) {
        const size_t i = static_cast<size_t>(v);
        const ld d = (std::isfinite(lsr[i]) && std::isfinite(ltr[i])) ? std::fabs(lsr[i] - ltr[i]) : 0;
        tv += (p[i] * relp[i] + q[i] * relq[i]) * (1 + d + jsd_extra);
      }
      e.loss_tol = 8 * tv + 8 * epsW * (V + 8) * (1 + std::fabs(ref.value)) + 1e-300L;
      bool near_tie = false;
      for (int v = 0; v < V; ++v) {
        const size_t i = static_cast<size_t>(v);
        const ld d = (std::isfinite(lsr[i]) && std::isfinite(ltr[i])) ? std::fabs(lsr[i] - ltr[i]) : 0;
        e.grad[i] = ref.grad[i] * gs;
        const ld base = (p[i] * relp[i] + q[i] * relq[i]) * (1 + d + jsd_extra + std::fabs(ref.value)) +
                        p[i] * (relp[i] + relq[i] + e.loss_tol);
        e.grad_tol[i] = std::fabs(scale) * (8 * base + floor_abs * (1 + std::fabs(ref.value) + d)) +
                        4 * epsG * std::fabs(e.grad[i]) + 2 * minG + 4 * minW;  // (intermediates below the work type's normal range flush)
        if (c.est == e_tv && (p[i] > 0 || q[i] > 0) && std::fabs(p[i] - q[i]) <= 16 * (p[i] * relp[i] + q[i] * relq[i]) + 1e-35L)
          near_tie = true;
      }
      if (near_tie) e.check_grad = false;  // sgn(p - q) flips between near-equal p and q
      if (c.want_grad) gradient_overflow(e, scale, r, maxG, maxW);
      continue;
    }

    // Sampled estimators.
    const int32_t y = c.ids[static_cast<size_t>(r)];
    const size_t yi = static_cast<size_t>(y);
    if (z[yi] == -ldinf || u[yi] == -ldinf) {
      e.errors.push_back({errc::infinite_divergence, r, y, ""});
      e.value_ok = false;
      e.strict = true;
      continue;
    }
    const ld s = lsr[yi], t = ltr[yi];
    ld so = s;
    if (c.has_s_old) {
      s_old[static_cast<size_t>(r)] = static_cast<double>(s) + c.s_old_delta[static_cast<size_t>(r)];
      if (!std::isfinite(s_old[static_cast<size_t>(r)])) s_old[static_cast<size_t>(r)] = c.s_old_delta[static_cast<size_t>(r)];
      so = s_old[static_cast<size_t>(r)];
    }
    const auto E = sampled_est(c.est);
    const auto U = sampled_usage(c.est);
    const naive::sampled_value sv = naive::sampled(E, U, s, so, t);
    // Perturbation box: s and t carry the work type's rounding (absolute error ~ eps * |logit|).
    const ld ds = 4 * epsW * (V + 8 + 2 * std::fabs(z[yi] / c.Ts) + 2 * std::fabs(amax));
    const ld dt = 4 * epsW * (V + 8 + 2 * std::fabs(u[yi] / c.Tt) + 2 * std::fabs(bmax));
    ld dl = 0, dd = 0, big = 0, big_exact = 0, small = 0;
    auto size_of = [&](const naive::sampled_value& x, ld s1, ld t1) {
      // The intermediates the library forms in double: rho = e^(s - s_old), r = e^(t - s) (k3), L, dL/ds.
      ld m = std::max(std::fabs(x.loss), std::fabs(x.dloss_ds));
      if (U == naive::usage::pg_reward) m = std::max(m, std::exp(s1 - (c.has_s_old ? so : s1)));
      if (E == naive::est::k3) m = std::max(m, std::exp(t1 - (U == naive::usage::pg_reward ? so : s1)));
      return std::isnan(m) ? ldinf : m;
    };
    big_exact = small = size_of(sv, s, t);
    for (int a = -1; a <= 1; a += 2)
      for (int b = -1; b <= 1; b += 2) {
        // Without s_old the library uses its own s as s_old: they move together.
        const naive::sampled_value pv = naive::sampled(E, U, s + a * ds, c.has_s_old ? so : s + a * ds, t + b * dt);
        dl = std::max(dl, std::fabs(pv.loss - sv.loss));
        dd = std::max(dd, std::fabs(pv.dloss_ds - sv.dloss_ds));
        big = std::max(big, size_of(pv, s + a * ds, t + b * dt));
        small = std::min(small, size_of(pv, s + a * ds, t + b * dt));
      }
    big = std::max(big, big_exact);
    // Overflow of double (documented: "the estimator overflows") where the reference, or the
    // reference within the input's precision, leaves double's range.
    if (!(big < 1e300L)) e.errors.push_back({errc::infinite_divergence, r, y, ""});
    if (!(small < 1.7e308L)) {  // overflows wherever the input's precision puts it
      e.value_ok = false;
      continue;
    }
    // (a perturbation that overflows: effectively no tolerance bound; finite so that 0 * it is 0)
    if (!std::isfinite(dl)) dl = std::numeric_limits<ld>::max() / 1e20L;
    if (!std::isfinite(dd)) dd = std::numeric_limits<ld>::max() / 1e20L;
    e.loss = sv.loss;
    e.has_ref = true;
    e.loss_tol = 2 * dl + 1e-13L * (1 + std::fabs(sv.loss));
    const std::vector<ld> g = naive::sampled_logit_grad(sv.dloss_ds, y, z, c.Ts);
    for (int v = 0; v < V; ++v) {
      const size_t i = static_cast<size_t>(v);
      const ld delta = (v == y) ? 1 : 0;
      e.grad[i] = g[i] * gs;
      const ld base = (2 * dd + 1e-13L * std::fabs(sv.dloss_ds)) * (delta + p[i]) + std::fabs(sv.dloss_ds) * p[i] * 8 * relp[i] +
                      4 * epsW * std::fabs(sv.dloss_ds) * (delta + p[i]);
      // The sparse term at y is added to the dense one in the output type: one more rounding
      // of the size of the term.
      e.grad_tol[i] = std::fabs(scale) * (base + floor_abs * (1 + std::fabs(sv.dloss_ds) + dd)) + 4 * epsG * std::fabs(e.grad[i]) +
                      4 * epsG * delta * std::fabs(sv.dloss_ds * scale) + 2 * minG + 4 * minW;  // (intermediates below the work type's normal range flush)
    }
    const ld dlds_box = std::fabs(sv.dloss_ds) + dd;  // largest |dL/ds| within the input's precision
    if (c.want_grad) gradient_overflow(e, scale, r, maxG, maxW, dlds_box * std::fabs(scale));
  }

  if (global.empty()) tolerate_flushed_grad_scale(rx, c.gscale, c.Ts, minW);
  accept_values_in_range_zone(rx);

  // ---- Call the library.
  const auto sview = tropd::matrix_view<const TS>{zs.data(), rows_n, V, stride};
  const auto tview = tropd::matrix_view<const TT>{zt.data(), c.fault == f_empty ? 0 : t_rows, t_cols, t_cols};
  const auto lview = tropd::vector_view<double>{loss.data(), loss_n};
  const auto gview = c.want_grad ? tropd::matrix_view<G>{grad.data(), rows_n, g_cols, g_cols} : tropd::matrix_view<G>{};
  const auto gsview = tropd::vector_view<const double>{gsv.data(), static_cast<index_t>(gsv.size())};
  tropd::status st;
  namespace host = tropd::host;
  const auto iv = tropd::vector_view<const int32_t>{idv.data(), static_cast<index_t>(idv.size())};
  const auto ov = tropd::vector_view<const double>{s_old.data(), static_cast<index_t>(s_old.size())};
  switch (c.est) {
    case e_rkl: st = host::divergence_rows(est::reverse_kl{}, sview, tview, lview, gview, opt, gsview); break;
    case e_jsd: st = host::divergence_rows(est::jsd{c.beta}, sview, tview, lview, gview, opt, gsview); break;
    case e_k1_pg: st = host::sampled_rows(est::sampled<est::k1, est::as_pg_reward>{}, sview, tview, iv, ov, lview, gview, opt, gsview); break;
    case e_k3_loss: st = host::sampled_rows(est::sampled<est::k3, est::as_loss>{}, sview, tview, iv, ov, lview, gview, opt, gsview); break;
    default:
      if constexpr (Full) {
        switch (c.est) {
          case e_fkl: st = host::divergence_rows(est::forward_kl{}, sview, tview, lview, gview, opt, gsview); break;
          case e_tv: st = host::divergence_rows(est::total_variation{}, sview, tview, lview, gview, opt, gsview); break;
          case e_k2_loss: st = host::sampled_rows(est::sampled<est::k2, est::as_loss>{}, sview, tview, iv, ov, lview, gview, opt, gsview); break;
          case e_k2_pg: st = host::sampled_rows(est::sampled<est::k2, est::as_pg_reward>{}, sview, tview, iv, ov, lview, gview, opt, gsview); break;
          default: st = host::sampled_rows(est::sampled<est::k3, est::as_pg_reward>{}, sview, tview, iv, ov, lview, gview, opt, gsview); break;
        }
      } else {
        fail(cat("internal: estimator ", est_name(c.est), " is not instantiated for this type pair"));
      }
  }

  note_outcome(st);
  // ---- Judge.
  if (std::getenv("TROPD_FUZZ_DUMP")) {
    for (int r = 0; r < N; ++r) {
      std::string d = cat("row ", r, " student:");
      for (int v = 0; v < V; ++v) d += cat(" ", static_cast<double>(zval(r, v)));
      d += " | teacher:";
      for (int v = 0; v < V; ++v) d += cat(" ", static_cast<double>(uval(r, v)));
      std::fprintf(stderr, "%s\n", d.c_str());
    }
    std::string so = "s_old:";
    for (double x : s_old) so += cat(" ", x);
    std::fprintf(stderr, "%s\nstatus: %s\n", so.c_str(), st.ok() ? "ok" : status_str(st).c_str());
  }
  judge_rows(st, global, rx, loss, grad, V, g_cols, c.want_grad, c.fused, c.threads);
}

/// The subset of estimators (reverse KL, JSD, k1 reward, k3 loss) for the other type pairs.
template <class TS, class TT, class G>
void run_subset(const cfg& c, input& in) {
  run<TS, TT, G, false>(c, in);
}

/// Decodes the case description (everything but the logits).
inline cfg decode(input& in) {
  cfg c;
  c.est = in.pick(n_est);
  c.N = 1 + in.pick(8);
  c.V = 1 + in.pick(64);
  // Element type pairs. Every estimator runs on fp32 / fp32 and fp64 / fp64; the 16-bit and
  // mixed pairs (and fp64 gradients) run a subset that covers each kind of row pass (one
  // pass, a second pass, sampled PG and sampled loss): the conversions are shared by all
  // estimators, and fewer instantiations keep the build of this target short.
  static const ety pairs[][2] = {{ety::f32, ety::f32}, {ety::f64, ety::f64}, {ety::bf16, ety::bf16}, {ety::fp16, ety::fp16},
                                 {ety::bf16, ety::f32}, {ety::fp16, ety::f64}};
  const int pr = in.pick(6);
  c.ts = pairs[pr][0];
  c.tt = pairs[pr][1];
  const uint8_t flags = in.u8();
  c.want_grad = (flags & 1) == 0 || (flags & 2) == 0;  // 3/4 with a gradient
  c.grad_double = (flags & 4) != 0 && pr == 0;
  if (pr >= 2 || c.grad_double) {
    static const int subset[] = {e_rkl, e_jsd, e_k1_pg, e_k3_loss};
    c.est = subset[c.est % 4];
  }
  c.fused = (flags & 8) != 0;
  c.threads = 1 + ((flags >> 4) % 3);
  static const double temps[] = {1, 1, 1, 1, 0.5, 2, 0.05, 20, 0.7, 1e-3, 1e-30, 1e30, 0, -1, dinf,
                                 std::numeric_limits<double>::quiet_NaN()};
  c.Ts = in.from(temps);
  c.Tt = in.bit() ? c.Ts : in.from(temps);
  static const double betas[] = {0.5, 0.5, 0.1, 0.9, 0, 1, 1e-300, 0.9999999999999999, -0.1, 1.5,
                                 std::numeric_limits<double>::quiet_NaN(), dinf};
  c.beta = in.from(betas);
  const uint8_t fb = in.u8();
  c.fault = fb >= 232 ? 1 + (fb - 232) % (n_fault - 1) : f_none;
  // Values.
  c.vs.neg_inf = in.bit();
  c.vs.specials = in.bit();
  c.vt.neg_inf = in.bit();
  c.vt.specials = in.bit();
  const double ms = c.ts == ety::fp16 ? 65504.0 : (c.ts == ety::f64 ? 1.7e308 : 3.3e38);
  const double mt = c.tt == ety::fp16 ? 65504.0 : (c.tt == ety::f64 ? 1.7e308 : 3.3e38);
  c.vs.scale = pick_scale(in, ms);
  c.vt.scale = in.bit() ? c.vs.scale : pick_scale(in, mt);
  c.vs.offset = pick_offset(in);
  c.vt.offset = in.bit() ? c.vs.offset : pick_offset(in);
  // grad_scale.
  if (in.pick(4) == 0) {
    static const double gss[] = {1, 1, 0.5, 0, -1, 1e-20, 1e20, 3, -0.0, std::numeric_limits<double>::quiet_NaN(), dinf, -dinf};
    for (int r = 0; r < c.N; ++r) c.gscale.push_back(in.from(gss));
  }
  // Sampled ids and s_old.
  if (is_sampled(c.est)) {
    for (int r = 0; r < c.N; ++r) {
      bool real = false;
      const uint8_t b = in.u8(&real);
      int32_t id = static_cast<int32_t>(b % c.V);
      if (real && b >= 250) {
        const int32_t bad[] = {-1, c.V, c.V + 5, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(), -7};
        id = bad[b - 250];
      }
      c.ids.push_back(id);
    }
    c.has_s_old = in.bit();
    if (c.has_s_old) {
      static const double deltas[] = {0, 0, 0.1, -0.3, 2, -5, 50, -50, 800, -800, 0.01, -0.01,
                                      std::numeric_limits<double>::quiet_NaN(), dinf, -dinf};
      for (int r = 0; r < c.N; ++r) c.s_old_delta.push_back(in.from(deltas));
    }
  }
  return c;
}

/// The fuzz check: decode, run, judge.
inline result check(const uint8_t* data, size_t size) {
  input in(data, size);
  const cfg c = decode(in);
  const std::string ctx = c.describe();
  return guarded(
      [&] {
        using tropd::bf16;
        using tropd::fp16;
        if (c.ts == ety::f32) {
          if (c.grad_double) run_subset<float, float, double>(c, in); else run<float, float, float>(c, in);
        } else if (c.ts == ety::f64) run<double, double, float>(c, in);
        else if (c.ts == ety::bf16 && c.tt == ety::bf16) run_subset<bf16, bf16, float>(c, in);
        else if (c.ts == ety::fp16 && c.tt == ety::fp16) run_subset<fp16, fp16, float>(c, in);
        else if (c.ts == ety::bf16) run_subset<bf16, float, float>(c, in);
        else run_subset<fp16, double, float>(c, in);
      },
      &ctx);
}

}  // namespace tropd_fuzz::rows
