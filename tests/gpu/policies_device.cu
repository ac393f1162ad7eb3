// Device instantiation of every policy's TROPD_HD code: each function below runs in a
// __global__ kernel (so nvcc rejects any host-only code a policy calls) and, unchanged, on
// the host; tropd_gpu_policies_check() compares the two runs value by value.
//
// Covered: numerics (exp_/log_/log1p_/expm1_/abs_, logaddexp, log1mexp, lse_state),
// Philox4x32-10, uniform_open0_closed1, log_uniform, bf16/fp16 conversions, to_acc;
// row_moments push/merge/rebase and summarize (fp32 and fp64); k1/k2/k3 value/dvalue_ds;
// sampled<E, U> for every pair except k1-as-loss (rejected at compile time); reverse_kl,
// forward_kl, jsd, total_variation check/accumulate/value/finite/grad (fp32 and fp64);
// topk_forward_kl check/eval (raw, renormalised, tail bucket); rewards k1_reward,
// sampled_term, vopd_reward, gopd_reward, proximal_reward; regions all_trusted,
// stochastic_acceptance, log_ratio_threshold, teacher_entropy_gate,
// entropy_top_fraction::trusted, sequence_ratio_bound::trusted, phase_switch; outliers
// drop, clip_reward, topk_fkl (form P and form C, clamp); clippers no_clip, pg_clip;
// evaluate_token for every objective type of tropd::presets; the per-token glue
// (rules::sequence_of, make_token, make_topk_row, check_token_values, check_topk_list /
// check_topk_id, log_prob_at; build_sparse_terms and sparse_terms' P_j; fold_tail,
// tail_estimate_usable; moment_element's support rule); and the GPU backend's own TROPD_HD
// rules (thread_moments, row_pass1_status, prob_split, grad_value, second_terms,
// scaled_error, the stage rules), whose fp32 exponentials and logs are the hardware's
// approximations on the device (compared at the fp32 tolerance).
#include "gpu/policies_device.hpp"

#include <tropd/core/numerics.hpp>
#include <tropd/core/random.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/token_batch.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/types.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/rewards.hpp>
#include <tropd/estimators/sampled.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/objective.hpp>
#include <tropd/regions/regions.hpp>
#include <tropd/gpu/detail/row_rules.hpp>
#include <tropd/objective/stage_rules.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using namespace tropd;
namespace te = tropd::estimators;
namespace tr = tropd::regions;
namespace to = tropd::outliers;
namespace tc = tropd::clippers;

constexpr int capacity = 8192;

/// Relative tolerances: values computed in double (device and host libm differ by an ulp or
/// two), and values computed in fp32 (CUDA's expf / logf / log1pf / expm1f and glibc's differ
/// by up to 2 ulp, amplified a little by sums).
constexpr double tol_fp64 = 1e-12;
constexpr double tol_fp32 = 2e-5;

/// Appends values (and the tolerance each one is compared with) to output arrays.
struct recorder {
  double* out;
  double* tol;
  int n = 0;
  double cur = tol_fp64;  ///< tolerance of the values recorded now
  TROPD_HD void operator()(double v) {
    if (n < capacity) {
      out[n] = v;
      tol[n] = cur;
    }
    ++n;
  }
  /// Records v with the fp32 tolerance.
  TROPD_HD void f32(double v) {
    const double keep = cur;
    cur = tol_fp32;
    (*this)(v);
    cur = keep;
  }
  TROPD_HD void status_of(const status& s) {
    (*this)(static_cast<double>(static_cast<int>(s.code)));
    (*this)(static_cast<double>(s.row));
    (*this)(static_cast<double>(s.col));
  }
};

// ---------------------------------------------------------------------------
// numerics, random numbers, 16-bit storage, row moments
// ---------------------------------------------------------------------------

template <class F>
TROPD_HD void moments_block(recorder& rec) {
  const double keep = rec.cur;
  rec.cur = sizeof(F) == 4 ? tol_fp32 : tol_fp64;
  const F a[] = {F(0.5), F(-1.25), -inf<F>(), F(3.0), F(2.5), F(-7.0), F(0.0), F(1.0)};
  const F b[] = {F(-0.5), F(2.0), -inf<F>(), F(1.0), -inf<F>(), F(-1.0), F(4.0), F(1.0)};
  te::row_moments<F> m, left, right;
  for (int i = 0; i < 8; ++i) m.push(a[i], b[i]);
  for (int i = 0; i < 4; ++i) left.push(a[i], b[i]);
  for (int i = 4; i < 8; ++i) right.push(a[i], b[i]);
  left.merge(right);
  te::row_moments<F> rb = m;
  rb.rebase(m.max_s + F(1), m.max_t + F(2));
  for (const te::row_moments<F>* p : {&m, &left, &rb}) {
    rec(p->max_s); rec(p->mass_s); rec(p->moment_s); rec(p->cross_s);
    rec(p->max_t); rec(p->mass_t); rec(p->moment_t); rec(p->cross_t);
  }
  // The support rule of the moment sums, element by element (estimators::moment_element).
  for (int i = 0; i < 8; ++i) {
    F e[6];
    te::moment_element<te::scalar_ops<F>>(a[i], b[i], F(3.0), F(4.0), true, te::exp_floor<F>, e);
    for (F x : e) rec(double(x));
    te::moment_element<te::scalar_ops<F>>(a[i], b[i], F(3.0), F(4.0), false, te::exp_floor<F>, e);
    rec(double(e[te::moment_w])); rec(double(e[te::moment_w_da]));
  }
  // Finite rows (for summarize): drop the zero-mass mismatch.
  te::row_moments<F> f;
  for (int i = 0; i < 8; ++i)
    if (i != 4) f.push(a[i], b[i]);
  const te::row_summary s = te::summarize(f);
  rec(s.lse_s); rec(s.lse_t); rec(s.rkl); rec(s.fkl); rec(s.ent_s); rec(s.ent_t);
  rec.cur = keep;
}

TROPD_HD void numerics_block(recorder& rec) {
  for (double x : {-30.0, -2.5, -0.3, 0.0, 0.7, 5.0}) {
    rec(exp_(x)); rec(log_(abs_(x) + 0.1)); rec(log1p_(abs_(x))); rec(expm1_(x)); rec(abs_(x));
    rec.f32(exp_(float(x))); rec.f32(log_(float(abs_(x) + 0.1))); rec.f32(log1p_(float(abs_(x)))); rec.f32(expm1_(float(x)));
    rec(abs_(float(x)));
    rec(logaddexp(x, -1.0)); rec.f32(logaddexp(float(x), -inf<float>())); rec.f32(logaddexp(float(x), 0.25f));
    rec(logaddexp(-inf<double>(), -inf<double>()));
    rec(log1mexp(-abs_(x) - 1e-3)); rec.f32(log1mexp(float(-abs_(x) - 1e-2f)));
    rec(is_nan(x) ? 1 : 0); rec(is_finite(x) ? 1 : 0); rec(max_(x, 0.5)); rec(min_(x, 0.5));
  }
  rec(log1mexp(0.0)); rec(is_nan(log1mexp(0.5)) ? 1 : 0); rec(is_finite(inf<float>()) ? 1 : 0); rec(is_nan(quiet_nan<double>()) ? 1 : 0);
  lse_state<double> l, l2;
  lse_state<float> lf;
  for (double x : {1.0, -3.0, -inf<double>(), 7.5, 7.25}) {
    l.push(x);
    lf.push(float(x));
  }
  l2.push(-2.0);
  l2.push(9.0);
  l.merge(l2);
  rec(l.m); rec(l.s); rec(l.value()); rec.f32(lf.value()); rec(lse_state<double>{}.value());

  // Philox4x32-10: the raw bijection and the draws used by the trust region.
  const philox4x32_10::ctr_type c = philox4x32_10::apply({{0u, 1u, 2u, 3u}}, {{0xdeadbeefu, 0x12345678u}});
  for (uint32_t v : c.v) rec(double(v));
  for (uint64_t k = 0; k < 6; ++k) {
    const draw_key key{0x5eedull + k, (1ull << 33) + k, 77 + k * 1000003ull, k * 13, streams::trust_region};
    rec(uniform_open0_closed1(key));
    rec(log_uniform(key));
  }
  // 16-bit storage.
  for (float f : {0.0f, -1.5f, 3.14159f, 65504.0f, 1e-6f, -1e-8f, 7e4f, inf<float>(), -inf<float>(), quiet_nan<float>()}) {
    const bf16 b = bf16::from_float(f);
    const fp16 h = fp16::from_float(f);
    rec(double(b.bits)); rec(double(h.bits)); rec(b.to_float()); rec(h.to_float()); rec(to_acc(b)); rec(to_acc(h));
  }
  rec(to_acc(1.25f)); rec(to_acc(2.5));
  moments_block<float>(rec);
  moments_block<double>(rec);
}

// ---------------------------------------------------------------------------
// estimators
// ---------------------------------------------------------------------------

template <class E, class U>
TROPD_HD void sampled_pair(recorder& rec) {
  const te::sampled<E, U> est{};
  for (double s : {-0.2, -1.5, -4.0})
    for (double t : {-0.1, -2.0, -9.0}) {
      const te::sampled_result r = est(s, s - 0.3, t);
      rec(r.loss); rec(r.dloss_ds); rec(r.advantage); rec(r.estimate);
    }
}

template <class Est, class F>
TROPD_HD void full_vocab_policy(const Est& est, recorder& rec) {
  const double keep = rec.cur;
  rec.cur = sizeof(F) == 4 ? tol_fp32 : tol_fp64;
  rec.status_of(est.check());
  te::row_moments<F> m;
  const F a[] = {F(0.5), F(-1.25), F(3.0), F(2.5), F(-7.0), F(1.0)};
  const F b[] = {F(-0.5), F(2.0), F(1.0), F(0.75), F(-1.0), F(1.0)};
  for (int i = 0; i < 6; ++i) m.push(a[i], b[i]);
  te::row_summary s = te::summarize(m);
  double acc[2] = {0, 0};
  for (int i = 0; i < 6; ++i) {
    const F ls = a[i] - F(s.lse_s), lt = b[i] - F(s.lse_t);
    est.accumulate(ls, lt, exp_(ls), exp_(lt), acc);
  }
  s.second[0] = acc[0];
  s.second[1] = acc[1];
  rec(acc[0]); rec(acc[1]); rec(est.value(s)); rec(est.finite(s) ? 1 : 0);
  for (int i = 0; i < 6; ++i) {
    const F ls = a[i] - F(s.lse_s), lt = b[i] - F(s.lse_t);
    rec(double(est.grad(ls, lt, exp_(ls), exp_(lt), s)));
  }
  te::row_summary inf_row = s;
  inf_row.rkl = inf<double>();
  inf_row.fkl = inf<double>();
  rec(est.finite(inf_row) ? 1 : 0);
  rec.cur = keep;
}

TROPD_HD void topk_block(recorder& rec) {
  const float lq[] = {-0.4f, -1.6f, -inf<float>(), -2.9f, -3.5f};
  const double ls[] = {-1.0, -0.9, 0.0, -4.0, -2.2};
  const double ls_bad[] = {-1.0, -inf<double>(), 0.0, -4.0, -2.2};
  for (te::topk_tail tail : {te::topk_tail::raw, te::topk_tail::renormalised, te::topk_tail::tail_bucket}) {
    const te::topk_forward_kl est{5, tail};
    rec.status_of(est.check());
    double g[5] = {9, 9, 9, 9, 9};
    const te::topk_result r = est.eval(lq, ls, 5, g);
    rec(r.value); rec(r.teacher_mass); rec(r.student_mass);
    rec.status_of(r.st);
    for (double v : g) rec(v);
    const te::topk_result r2 = est.eval(lq, ls_bad, 5, nullptr);
    rec.status_of(r2.st);
  }
  rec.status_of(te::topk_forward_kl{0, te::topk_tail::raw}.check());
  const float heavy[] = {-0.1f, -0.2f};
  const double hs[] = {-1.0, -2.0};
  rec.status_of(te::topk_forward_kl{2, te::topk_tail::raw}.eval(heavy, hs, 2, nullptr).st);
}

TROPD_HD void estimators_block(recorder& rec) {
  for (double s : {-0.5, -3.0})
    for (double t : {-0.25, -6.0}) {
      rec(te::k1::value(s, t)); rec(te::k1::dvalue_ds(s, t));
      rec(te::k2::value(s, t)); rec(te::k2::dvalue_ds(s, t));
      rec(te::k3::value(s, t)); rec(te::k3::dvalue_ds(s, t));
    }
  sampled_pair<te::k1, te::as_pg_reward>(rec);
  sampled_pair<te::k2, te::as_pg_reward>(rec);
  sampled_pair<te::k3, te::as_pg_reward>(rec);
  sampled_pair<te::k2, te::as_loss>(rec);
  sampled_pair<te::k3, te::as_loss>(rec);
  full_vocab_policy<te::reverse_kl, float>(te::reverse_kl{}, rec);
  full_vocab_policy<te::reverse_kl, double>(te::reverse_kl{}, rec);
  full_vocab_policy<te::forward_kl, float>(te::forward_kl{}, rec);
  full_vocab_policy<te::forward_kl, double>(te::forward_kl{}, rec);
  for (double beta : {0.0, 0.3, 1.0}) {
    full_vocab_policy<te::jsd, float>(te::jsd{beta}, rec);
    full_vocab_policy<te::jsd, double>(te::jsd{beta}, rec);
    rec.f32(double(te::jsd{beta}.log_m(-1.0f, -2.0f)));
  }
  rec.status_of(te::jsd{1.5}.check());
  full_vocab_policy<te::total_variation, float>(te::total_variation{}, rec);
  full_vocab_policy<te::total_variation, double>(te::total_variation{}, rec);
  topk_block(rec);
}

// ---------------------------------------------------------------------------
// rewards, regions, outliers, clippers
// ---------------------------------------------------------------------------

template <class T>
TROPD_HD void trust_value_of(const T& est, recorder& rec) {
  rec.status_of(est.check());
  for (double s : {-0.3, -2.0})
    for (double t : {-0.1, -4.0}) {
      token tk;
      tk.from = origin::student;
      tk.s = s;
      tk.s_old = s - 0.2;
      tk.t = t;
      tk.R = t - tk.s_old;
      tk.rkl = 0.7;
      tk.ref = -1.5;
      const te::trust_value v = est(tk);
      rec(v.pg ? 1 : 0); rec(v.advantage); rec(v.loss); rec(v.dloss_ds);
    }
}

TROPD_HD void rewards_block(recorder& rec) {
  trust_value_of(te::k1_reward{}, rec);
  trust_value_of(te::sampled_term<te::k1, te::as_pg_reward>{}, rec);
  trust_value_of(te::sampled_term<te::k2, te::as_pg_reward>{}, rec);
  trust_value_of(te::sampled_term<te::k3, te::as_pg_reward>{}, rec);
  trust_value_of(te::sampled_term<te::k2, te::as_loss>{}, rec);
  trust_value_of(te::sampled_term<te::k3, te::as_loss>{}, rec);
  trust_value_of(te::vopd_reward{}, rec);
  trust_value_of(te::gopd_reward{1.25}, rec);
  trust_value_of(te::proximal_reward{0.3, 0.7}, rec);
  rec.status_of(te::gopd_reward{inf<double>()}.check());
  rec.status_of(te::proximal_reward{1.5, 1.0}.check());
}

template <class R>
TROPD_HD void region_of(const R& region, const tr::batch_context& ctx, recorder& rec) {
  rec.status_of(region.check());
  for (int i = 0; i < 24; ++i) {
    token tv;
    tv.s = -0.1 * i;
    tv.s_old = tv.s - 0.05;
    tv.t = -0.3 * i;
    tv.R = i == 23 ? -inf<double>() : tv.t - tv.s_old;
    tv.ent_s = 0.13 * i;
    tv.ent_t = 0.11 * (24 - i);
    tv.seq_id = 1000 + uint64_t(i / 5);
    tv.position = uint64_t(i % 5);
    tv.seq_index = i / 5;
    rec(region.trusted(tv, ctx) ? 1 : 0);
  }
}

TROPD_HD void regions_block(recorder& rec) {
  const uint8_t masked[5] = {0, 1, 0, 0, 1};
  tr::batch_context ctx{0x1234ull, 42, 1.3, masked};
  region_of(tr::all_trusted{}, ctx, rec);
  region_of(tr::stochastic_acceptance{}, ctx, rec);
  region_of(tr::log_ratio_threshold{-1.0}, ctx, rec);
  region_of(tr::teacher_entropy_gate{0.8}, ctx, rec);
  region_of(tr::entropy_top_fraction{0.2}, ctx, rec);
  region_of(tr::sequence_ratio_bound{2.0, true}, ctx, rec);
  tr::phase_switch<tr::log_ratio_threshold, tr::entropy_top_fraction> ps;
  ps.first.tau = -2.0;
  ps.switch_step = 40;
  region_of(ps, ctx, rec);
  ps.switch_step = 50;
  region_of(ps, ctx, rec);
  ps.switch_step = -1;
  rec.status_of(ps.check());
  rec.status_of(tr::log_ratio_threshold{quiet_nan<double>()}.check());
}

template <class O>
TROPD_HD void outlier_of(const O& o, recorder& rec) {
  rec.status_of(o.check());
  const float tq[] = {-0.4f, -1.6f, -inf<float>(), -2.9f};
  const float ts[] = {-1.0f, -0.9f, 0.0f, -4.0f};
  const double tso[] = {-1.1, -0.8, 0.0, -3.5};
  topk_row row;
  row.teacher = values_row{tq, scalar_type::f32};
  row.student = values_row{ts, scalar_type::f32};
  row.student_old = values_row{tso, scalar_type::f64};
  row.k = 4;
  for (double R : {0.5, -1.0, -7.0, -inf<double>()}) {
    double g[4] = {7, 7, 7, 7};
    token tk;
    tk.from = origin::student;
    tk.R = R;
    tk.t = R - 1.0;
    tk.s = tk.s_old = -1.0;
    const to::outlier_value v = o(tk, row, g);
    rec(v.kept ? 1 : 0); rec(v.pg ? 1 : 0); rec(v.advantage); rec(v.loss); rec(v.clipped ? 1 : 0);
    rec(v.teacher_mass); rec(v.student_mass);
    rec.status_of(v.st);
    for (double x : g) rec(x);
  }
}

TROPD_HD void outliers_clippers_block(recorder& rec) {
  outlier_of(to::drop{}, rec);
  outlier_of(to::clip_reward{-3.0}, rec);
  to::topk_fkl p;
  p.form = to::fkl_form::p;
  p.weight = 0.5;
  outlier_of(p, rec);
  to::topk_fkl c;
  c.form = to::fkl_form::c;
  outlier_of(c, rec);
  c.clamp = 0.1;
  outlier_of(c, rec);
  c.clamp = 0;
  rec.status_of(c.check());

  tc::pg_clip ppo;
  ppo.eps_low = 0.2;
  ppo.eps_high = 0.28;
  ppo.dual_c = 3.0;
  ppo.adv_lo = -4.0;
  ppo.adv_hi = 2.0;
  rec.status_of(ppo.check());
  rec.status_of(tc::no_clip{}.check());
  for (double a : {-6.0, -0.5, 0.0, 0.7, 3.0})
    for (double ds : {-0.5, -0.1, 0.0, 0.15, 0.6}) {
      for (const tc::clipped_term& t : {tc::no_clip{}(a, -1.0 + ds, -1.0), ppo(a, -1.0 + ds, -1.0), tc::pg_clip{}(a, -1.0 + ds, -1.0)}) {
        rec(t.advantage); rec(t.loss); rec(t.dloss_ds); rec(t.adv_clipped ? 1 : 0); rec(t.ratio_clipped ? 1 : 0);
      }
    }
  tc::pg_clip bad;
  bad.dual_c = 0.5;
  rec.status_of(bad.check());
}

// ---------------------------------------------------------------------------
// evaluate_token for every preset objective type
// ---------------------------------------------------------------------------

template <class Obj>
TROPD_HD void objective_of(const Obj& obj, recorder& rec) {
  rec.status_of(obj.trust.check());
  const float tq[] = {-0.4f, -1.6f, -inf<float>(), -2.9f};
  const float ts[] = {-1.0f, -0.9f, 0.0f, -4.0f};
  const float tso[] = {-1.1f, -0.8f, 0.0f, -3.5f};
  for (int k = 0; k < 10; ++k) {
    token in;
    in.from = k < 2 ? origin::prompt : (k < 4 ? origin::teacher : origin::student);
    in.s = -0.2 - 0.3 * k;
    in.s_old = in.s + (k % 3 - 1) * 0.25;
    in.t = k == 9 ? -inf<double>() : -0.1 - 0.7 * (k % 4);
    in.R = in.t - in.s_old;
    in.rkl = 0.3 + 0.1 * k;
    in.ref = -1.0 - 0.05 * k;
    topk_row list;
    list.teacher = values_row{tq, scalar_type::f32};
    list.student = values_row{ts, scalar_type::f32};
    list.student_old = k % 2 ? values_row{tso, scalar_type::f32} : list.student;
    list.k = 4;
    for (bool trusted : {true, false}) {
      double g[4] = {5, 5, 5, 5};
      const token_result r = evaluate_token(obj, in, list, trusted, g);
      rec(r.loss); rec(r.dloss_ds); rec(r.advantage); rec(r.loss_trust); rec(r.loss_outlier); rec(r.loss_guidance);
      rec(r.teacher_mass); rec(r.student_mass); rec(r.topk_grad ? 1 : 0); rec(double(r.flags));
      rec.status_of(r.st);
      for (double x : g) rec(x);
    }
  }
}

/// One configured objective of every preset type (built on the host by the preset functions).
struct objective_set {
  presets::opd_objective opd;
  presets::opd_objective opd_ppo;
  presets::eopd_objective eopd;
  presets::reopold_objective reopold;
  presets::entropy_opd_objective entropy_opd;
  presets::clip_outlier_objective clip_outlier;
  presets::mask_outlier_objective mask_outlier;
  presets::fkl_outlier_objective tropd_c;
  presets::fkl_outlier_objective tropd_p;
  objective<tr::all_trusted, te::k1_reward, to::drop, tc::pg_clip, te::jsd> k1_jsd;  // PG trust term + dense term
  presets::gkd_objective gkd;
  presets::vopd_objective vopd;
  presets::gopd_objective gopd;
};

objective_set make_objectives() {
  objective_set o;
  o.opd = presets::opd();
  tc::pg_clip clip;
  clip.eps_low = 0.2;
  clip.eps_high = 0.2;
  o.opd_ppo = presets::opd({.clip = clip});
  o.eopd = presets::eopd();
  o.reopold = presets::reopold({.floor = -2.0, .switch_step = 100});
  o.entropy_opd = presets::entropy_opd();
  o.clip_outlier = presets::clip_outlier({.tau = -3.0, .guidance_beta = 1e-3});
  o.mask_outlier = presets::mask_outlier({.tau = -3.0, .guidance_beta = 1e-3});
  o.tropd_c = presets::tropd({.beta = 1e-3, .k = 64, .form = to::fkl_form::c, .clamp = 2.0});
  o.tropd_p = presets::tropd({.beta = 1e-3, .k = 64, .form = to::fkl_form::p});
  o.tropd_p.guidance = guidance_form::pg;
  o.k1_jsd.guidance_beta = 0.01;
  o.gkd = presets::gkd({.beta = 0.4});
  o.vopd = presets::vopd();
  o.gopd = presets::gopd({.lambda = 1.25});
  return o;
}

TROPD_HD void objectives_block(const objective_set& o, recorder& rec) {
  objective_of(o.opd, rec);
  objective_of(o.opd_ppo, rec);
  objective_of(o.eopd, rec);
  objective_of(o.reopold, rec);
  objective_of(o.entropy_opd, rec);
  objective_of(o.clip_outlier, rec);
  objective_of(o.mask_outlier, rec);
  objective_of(o.tropd_c, rec);
  objective_of(o.tropd_p, rec);
  objective_of(o.k1_jsd, rec);
  objective_of(o.gkd, rec);
  objective_of(o.vopd, rec);
  objective_of(o.gopd, rec);
}

// ---------------------------------------------------------------------------
// The per-token glue (core/token_rules.hpp, core/sparse_terms.hpp, the top-k helpers) and the
// GPU backend's own TROPD_HD rules (gpu/detail/row_rules.hpp, stage_rules.hpp)
// ---------------------------------------------------------------------------

TROPD_HD void rules_block(recorder& rec) {
  // A batch of 6 tokens in 2 sequences with lists of 3 (views over local arrays).
  const double s[6] = {-0.5, -1.2, -0.3, -2.0, -0.7, -1.1};
  const float s_old[6] = {-0.45f, -1.3f, -0.35f, -1.9f, -0.6f, -1.0f};
  const double t[6] = {-0.2, -inf<double>(), -0.9, -0.1, -3.0, -0.8};
  const double ent[6] = {0.5, 1.5, 0.7, 2.2, 0.1, 0.9};
  const origin from[6] = {origin::prompt, origin::teacher, origin::student, origin::student, origin::student, origin::teacher};
  const index_t off[3] = {0, 2, 6};
  const uint64_t ids[2] = {11, 12};
  const int32_t tk_ids[18] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 1, 7, 2, 2, 5, 0, 1, 2};
  const double tq[18] = {-0.5, -1.0, -2.0, -0.3, -inf<double>(), -1.5, -0.2, -0.9, -3.0, -0.4, -0.8, -1.7, -0.6, -0.7, -0.9, -1, -2, -3};
  const double ts[18] = {-0.6, -1.1, -1.9, -0.4, -2.0, -1.2, -0.3, -1.0, -2.5, -0.5, -0.9, -1.5, -0.4, -0.8, -1.0, -1, -2, -3};
  token_batch b;
  b.s = values_view(s, 6);
  b.s_old = values_view(s_old, 6);
  b.t = values_view(t, 6);
  b.from = {from, 6};
  b.seq_offsets = {off, 3};
  b.seq_ids = {ids, 2};
  b.student_entropy = values_view(ent, 6);
  b.topk_ids = make_matrix<const int32_t>(tk_ids, 6, 3);
  b.topk_teacher = values_matrix(tq, 6, 3, 3);
  b.topk_student = values_matrix(ts, 6, 3, 3);
  for (index_t i = 0; i < 6; ++i) {
    const index_t j = rules::sequence_of(off, 2, i);
    const token tk = rules::make_token(b, i, j);
    rec(double(j)); rec(double(int(tk.from))); rec(tk.s); rec(tk.s_old); rec(tk.t); rec(tk.R); rec(tk.ent_s);
    rec(is_nan(tk.ent_t) ? 1 : 0); rec(double(tk.seq_id)); rec(double(tk.position)); rec(double(tk.seq_index));
    const topk_row row = rules::make_topk_row(b, i);
    rec(double(row.k)); rec(row.teacher[0]); rec(row.student[2]); rec(row.student_old[1]);
    rec.status_of(rules::check_token_values(b, i, true));
    rec.status_of(rules::check_topk_list(b.topk_ids.row(i), b.topk_teacher.row(i), 3, 9, i));
    for (int e = 0; e < 3; ++e) rec.status_of(rules::check_topk_id(b.topk_ids.row(i), b.topk_teacher.row(i), e, -1, i));
  }
  const float logits[5] = {0.5f, -1.0f, 2.0f, -inf<float>(), 0.25f};
  const bf16 logits16[2] = {bf16::from_float(1.5f), bf16::from_float(-0.75f)};
  for (int32_t id = 0; id < 5; ++id) rec(rules::log_prob_at(logits, id, 1.0f / 0.7f, 2.4));
  rec(rules::log_prob_at(logits16, 1, 1.25f, 0.3));
  rec(rules::log_prob_at(tq, 2, 1.0 / 1.3, -0.1));
  // Sparse terms and the top-k helpers.
  const double g[3] = {-0.3, -0.2, -0.1};
  int32_t sid[4];
  double sco[4];
  const sparse_terms sp = build_sparse_terms(tk_ids + 3, values_row{tq + 3, scalar_type::f64}, g, 3, 1.7, 0.25, 4, 0.6, sid, sco);
  rec(double(sp.n)); rec(double(sp.n_listed)); rec(sp.sum()); rec(sp.p_coef_listed(sp.sum())); rec(sp.p_coef_other(sp.sum()));
  rec(sp.split() ? 1 : 0); rec(sp.magnitude_bound());
  for (int e = 0; e < sp.n; ++e) { rec(double(sid[e])); rec(sco[e]); }
  double gf[3] = {-0.3, -0.2, -0.1};
  te::fold_tail(values_row{tq, scalar_type::f64}, values_row{ts, scalar_type::f64}, 3, 0.4, gf);
  for (double x : gf) rec(x);
  rec(te::tail_estimate_usable(-1.0, 64, 20.0) ? 1 : 0);
  rec(te::tail_estimate_usable(-9.0, 64, 20.0) ? 1 : 0);
  rec(te::tail_estimate_usable(-1.0, 64, 1e5) ? 1 : 0);
  // The GPU backend's row rules (fp32 exponentials and logs in hardware on the device).
  namespace gd = tropd::gpu::detail;
  namespace sr = tropd::stage_rules;
  const float z[8] = {0.5f, -1.25f, -inf<float>(), 3.0f, 2.5f, -7.0f, 0.0f, 1.0f};
  const float u[8] = {-0.5f, 2.0f, -inf<float>(), 1.0f, 0.75f, -1.0f, 4.0f, 1.0f};
  for (int m = 0; m < 2; ++m) {
    te::row_moments<double> acc;
    gd::thread_moments<float, true> tm(m ? 1.0 / 0.7 : 1.0, 1.0, &acc);
    tm.add<8>(z, u);
    const float z2[4] = {0.1f, 0.2f, 0.3f, 0.4f}, u2[4] = {1.0f, 1.1f, 1.2f, 1.3f};
    tm.add<4>(z2, u2);  // the fast path
    const gd::pass1_partial p = tm.finish();
    rec.f32(p.m.max_s); rec.f32(p.m.mass_s); rec.f32(p.m.moment_s); rec.f32(p.m.cross_s);
    rec.f32(p.m.max_t); rec.f32(p.m.mass_t); rec.f32(p.m.moment_t); rec.f32(p.m.cross_t); rec(double(p.flagged));
    te::row_summary sum{};
    const gd::pass1_verdict v = gd::row_pass1_status<te::all_moments>(p, true, sum);
    rec(double(int(v.code)));
    rec.f32(sum.lse_s); rec.f32(sum.lse_t); rec.f32(sum.ent_s); rec.f32(sum.ent_t); rec.f32(sum.rkl); rec.f32(sum.fkl);
    const gd::prob_split<float> ps(sum.lse_s, gd::pass_units<float>::scale(m ? 1.0 / 0.7 : 1.0)), pt(sum.lse_t, gd::pass_units<float>::scale(1.0));
    for (int i = 0; i < 8; ++i) {
      rec.f32(gd::grad_value<float, te::reverse_kl, float>(te::reverse_kl{}, ps, pt, z[i], u[i], 0.5f, 0.25f, sum));
      rec.f32(gd::grad_value<float, te::jsd, float>(te::jsd{0.3}, ps, pt, z[i], u[i], 0.5f, 0.25f, sum));
      float t0, t1;
      gd::second_terms<float>(te::total_variation{}, ps.log_prob(ps.exponent(z[i])), pt.log_prob(pt.exponent(u[i])), ps.prob(ps.exponent(z[i])),
                              pt.prob(pt.exponent(u[i])), t0, t1);
      rec.f32(t0); rec.f32(t1);
    }
  }
  for (float x : {1.0f, -inf<float>(), quiet_nan<float>(), inf<float>(), 3.0e38f, -3.0e38f})
    for (float it : {1.0f, 4.0f}) rec(double(int(gd::scaled_error<float>(x, it))));
  // The token stages' per-item rules.
  sr::diag_partial dp;
  for (index_t i = 0; i < 6; ++i) {
    token_result r;
    r.flags = uint8_t(i % 2 ? flags::counted | flags::kept : flags::counted);
    r.loss_trust = 0.1 * double(i);
    r.dloss_ds = -0.2 * double(i);
    r.teacher_mass = i == 3 ? 0.7 : 0.0;
    r.student_mass = 0.6;
    const sr::token_record x = sr::make_record(r, i % 3 == 0);
    const double w = sr::token_weight(x.flags, 0.5, 4.0);
    rec(w);
    dp.add(b, i, x, w, 0.0, 0.0);
    rec(sr::output_fits(x, g, values_row{tq, scalar_type::f64}, values_row{ts, scalar_type::f64}, 3, w, 1e300) ? 1 : 0);
    rec(sr::folded_topk(x, g, values_row{tq, scalar_type::f64}, values_row{ts, scalar_type::f64}, 1));
  }
  const diagnostics d = dp.finish(6, 4.0, true, false, false, 1, false);
  rec(d.loss); rec(d.loss_trust); rec(double(d.n_student)); rec(double(d.n_trusted)); rec(d.tv_estimate); rec(d.mean_R_trusted);
  rec(d.mean_student_entropy); rec(d.mean_topk_teacher_mass);
  rec(double(tropd::regions::entropy_top_fraction::threshold_rank(0.2, 7))); rec(double(tropd::regions::entropy_top_fraction::threshold_rank(1.0, 7))); rec(double(tropd::regions::entropy_top_fraction::threshold_rank(0.2, 0)));
}

// ---------------------------------------------------------------------------
// Kernels (one thread each) and the host twin
// ---------------------------------------------------------------------------

enum block_id { numerics_id = 0, estimators_id, rewards_id, regions_id, outliers_id, objectives_id, rules_id, block_count };

// The kernels write their values to out[0, capacity) and tolerances to out[capacity, 2 * capacity).
__global__ void numerics_kernel(double* out, int* n) { recorder r{out, out + capacity}; numerics_block(r); *n = r.n; }
__global__ void estimators_kernel(double* out, int* n) { recorder r{out, out + capacity}; estimators_block(r); *n = r.n; }
__global__ void rewards_kernel(double* out, int* n) { recorder r{out, out + capacity}; rewards_block(r); *n = r.n; }
__global__ void regions_kernel(double* out, int* n) { recorder r{out, out + capacity}; regions_block(r); *n = r.n; }
__global__ void outliers_kernel(double* out, int* n) { recorder r{out, out + capacity}; outliers_clippers_block(r); *n = r.n; }
__global__ void rules_kernel(double* out, int* n) { recorder r{out, out + capacity}; rules_block(r); *n = r.n; }
__global__ void objectives_kernel(objective_set o, double* out, int* n) {
  recorder r{out, out + capacity};
  objectives_block(o, r);
  *n = r.n;
}

const char* block_name(int b) {
  static const char* names[] = {"numerics", "estimators", "rewards", "regions", "outliers/clippers", "objectives", "rules"};
  return names[b];
}

int host_block(int b, const objective_set& o, double* out, double* tol) {
  recorder r{out, tol};
  switch (b) {
    case numerics_id: numerics_block(r); break;
    case estimators_id: estimators_block(r); break;
    case rewards_id: rewards_block(r); break;
    case regions_id: regions_block(r); break;
    case outliers_id: outliers_clippers_block(r); break;
    case rules_id: rules_block(r); break;
    default: objectives_block(o, r); break;
  }
  return r.n;
}

bool agrees(double d, double h, double tol) {
  if (std::isnan(h)) return std::isnan(d);
  if (d == h) return true;
  return std::fabs(d - h) <= tol * std::max(1.0, std::fabs(h));
}

}  // namespace

int tropd_gpu_policies_check(std::string* report) {
  const objective_set objs = make_objectives();
  double* d_out = nullptr;
  int* d_n = nullptr;
  cudaError_t e = cudaMalloc(&d_out, sizeof(double) * 2 * capacity * block_count);
  if (e == cudaSuccess) e = cudaMalloc(&d_n, sizeof(int) * block_count);
  if (e == cudaSuccess) e = cudaMemset(d_out, 0xff, sizeof(double) * 2 * capacity * block_count);
  if (e == cudaSuccess) {
    numerics_kernel<<<1, 1>>>(d_out + numerics_id * 2 * capacity, d_n + numerics_id);
    estimators_kernel<<<1, 1>>>(d_out + estimators_id * 2 * capacity, d_n + estimators_id);
    rewards_kernel<<<1, 1>>>(d_out + rewards_id * 2 * capacity, d_n + rewards_id);
    regions_kernel<<<1, 1>>>(d_out + regions_id * 2 * capacity, d_n + regions_id);
    outliers_kernel<<<1, 1>>>(d_out + outliers_id * 2 * capacity, d_n + outliers_id);
    objectives_kernel<<<1, 1>>>(objs, d_out + objectives_id * 2 * capacity, d_n + objectives_id);
    rules_kernel<<<1, 1>>>(d_out + rules_id * 2 * capacity, d_n + rules_id);
    e = cudaGetLastError();
  }
  std::vector<double> dev(static_cast<size_t>(2 * capacity) * block_count);
  std::vector<int> dev_n(block_count, 0);
  if (e == cudaSuccess) e = cudaMemcpy(dev.data(), d_out, sizeof(double) * dev.size(), cudaMemcpyDeviceToHost);
  if (e == cudaSuccess) e = cudaMemcpy(dev_n.data(), d_n, sizeof(int) * block_count, cudaMemcpyDeviceToHost);
  cudaFree(d_out);
  cudaFree(d_n);
  if (e != cudaSuccess) {
    if (report) *report = std::string("CUDA error: ") + cudaGetErrorString(e);
    return static_cast<int>(e);
  }
  int mismatches = 0;
  std::string text;
  std::vector<double> host(capacity), tol(capacity);
  for (int b = 0; b < block_count; ++b) {
    const int hn = host_block(b, objs, host.data(), tol.data());
    if (hn != dev_n[static_cast<size_t>(b)] || hn > capacity) {
      ++mismatches;
      text += std::string(block_name(b)) + ": " + std::to_string(dev_n[static_cast<size_t>(b)]) + " device values vs " +
              std::to_string(hn) + " host values (capacity " + std::to_string(capacity) + ")\n";
      continue;
    }
    for (int i = 0; i < hn; ++i) {
      const double d = dev[static_cast<size_t>(b) * 2 * capacity + static_cast<size_t>(i)], h = host[static_cast<size_t>(i)];
      if (!agrees(d, h, tol[static_cast<size_t>(i)])) {
        if (++mismatches <= 20)
          text += std::string(block_name(b)) + "[" + std::to_string(i) + "]: device " + std::to_string(d) + " host " +
                  std::to_string(h) + "\n";
      }
    }
    text += std::string(block_name(b)) + ": " + std::to_string(hn) + " values compared\n";
  }
  if (report) *report = text;
  return -mismatches;
}
