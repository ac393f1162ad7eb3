// fuzz/target_objective.hpp: the token-level objective, host::evaluate_tokens, with the
// presets of tropd/objective.hpp, against the naive long-double objective reference
// (tests/reference/naive_objective.hpp) or a documented error; both input policies.
//
// Decoded case: preset (OPD, OPD with PPO + dual clip, TrOPD form C / clamped / form P,
// FKL outlier with a raw tail, clip / mask outlier, EOPD, REOPOLD in either phase, Entropy
// OPD, vOPD, G-OPD, GKD), its parameters (in and out of domain), guidance form,
// aggregation mode and normaliser, input policy, seed and step; then 1-12 tokens in 1-4
// sequences with origin tags (also invalid), s, s_old, t (log-probs; -inf, NaN, +inf,
// positive values, huge magnitudes from real input bytes), entropies / rkl / ref (supplied
// or not), and top-k lists of width 1-6 (padding, repeated and negative ids, NaN / +inf,
// unnormalised) with the student's current and rollout-time log-probs at them.
//
// Rules checked (docs/robustness.md):
//   * an objective parameter outside its domain -> invalid_parameter; a full-vocabulary term
//     at token level -> unsupported; structure faults -> empty_batch / shape_mismatch /
//     invalid_parameter (origin tag, with the token) / unsupported (a missing input);
//   * top-k ids of student tokens (negative, repeated) -> id_out_of_range / duplicate_topk_id
//     at (token, entry) under either policy (structure);
//   * input_policy::reject: the first bad token value (token order, then entry order) ->
//     its code at (token, entry); input_policy::mask: exactly the bad tokens become prompt
//     tokens (compared with the reference on a batch where they are prompt tokens) and are
//     counted in diagnostics::n_masked_input;
//   * then the first token whose term is infinite -> infinite_divergence (top-k: at the entry);
//     a top-k list without a finite entry or a raw list with mass > 1 + 1e-4 -> invalid_topk_list;
//   * otherwise the loss (double), dL/ds, advantages, top-k gradients (float), the flags'
//     region / kept / counted / guidance bits and the diagnostics' counts, within rounding;
//     the stochastic region's decisions equal Philox draws keyed as documented;
//   * poison: nothing written on failure, every requested output written on success.
#pragma once

#include <algorithm>
#include <climits>

#include "judge.hpp"
#include "reference/naive_objective.hpp"

namespace tropd_fuzz::objective {

namespace no = tropd_test::naive_obj;
namespace presets = tropd::presets;
using tropd::origin;

enum preset_id : int {
  p_opd, p_opd_clip, p_tropd_c, p_tropd_c_clamp, p_tropd_p, p_fkl_raw, p_clip_outlier, p_mask_outlier,
  p_eopd, p_reopold, p_entropy_opd, p_vopd, p_gopd, p_gkd, n_preset
};
inline const char* preset_name(int p) {
  static const char* n[] = {"opd", "opd+ppo+dual", "tropd C", "tropd C clamp", "tropd P", "fkl_outlier raw", "clip_outlier",
                            "mask_outlier", "eopd", "reopold", "entropy_opd", "vopd", "gopd", "gkd"};
  return n[p];
}

enum fault : int { f_none, f_empty, f_t_size, f_off_end, f_off_decreasing, f_origin_tag, f_seq_ids, f_topk_cols, f_out_size, n_fault };

struct cfg {
  int preset = 0;
  // parameters
  double beta = 1e-3, tau = -2, clamp = 5, fraction = 0.2, lambda = 1.25, floor = -3, eps_low = 0.2, eps_high = 0.28, dual = 3;
  int k = 64;
  long long switch_step = 10;
  bool guidance_pg = false;
  int agg = 0;
  double normaliser = 0, constant = 1;
  bool mask = false;
  uint64_t seed = 0, step = 0;
  int fault = f_none;
  // batch
  int n = 1, n_seq = 1, K = 0;
  std::vector<index_t> off;
  std::vector<uint8_t> from;  // raw tags (3 = invalid)
  std::vector<float> s, s_old, t, hs, ht, rkl, ref;
  bool has_s_old = false, has_hs = false, has_ht = false, has_rkl = false, has_ref = false, has_seq_ids = false, has_ls_old = false;
  std::vector<uint64_t> seq_ids;
  std::vector<int32_t> ids;
  std::vector<float> lq, ls, ls_old;
  bool want_ds = true, want_adv = true, want_topk = true;

  std::string describe() const {
    std::string d = cat("objective: preset=", preset_name(preset), " beta=", beta, " tau=", tau, " clamp=", clamp, " k=", k,
                        " fraction=", fraction, " lambda=", lambda, " floor=", floor, " eps=", eps_low, "/", eps_high, " dual=", dual,
                        " switch=", switch_step, " guidance_pg=", guidance_pg, " agg=", agg, " normaliser=", normaliser,
                        " constant=", constant, " mask=", mask, " seed=", seed, " step=", step, " fault=", fault, " n=", n,
                        " K=", K, " offsets=[");
    for (auto o : off) d += cat(o, " ");
    d += "]\n  tokens:";
    for (int i = 0; i < n; ++i) {
      d += cat("\n   ", i, ": from=", int(from[static_cast<size_t>(i)]), " s=", s[static_cast<size_t>(i)], " t=", t[static_cast<size_t>(i)]);
      if (has_s_old) d += cat(" s_old=", s_old[static_cast<size_t>(i)]);
      if (has_hs) d += cat(" Hs=", hs[static_cast<size_t>(i)]);
      if (has_ht) d += cat(" Ht=", ht[static_cast<size_t>(i)]);
      if (has_rkl) d += cat(" rkl=", rkl[static_cast<size_t>(i)]);
      if (has_ref) d += cat(" ref=", ref[static_cast<size_t>(i)]);
      if (K > 0) {
        d += " topk=[";
        for (int k2 = 0; k2 < K; ++k2) {
          const size_t j = static_cast<size_t>(i * K + k2);
          d += cat("(", ids[j], " ", lq[j], " ", ls[j]);
          if (has_ls_old) d += cat(" ", ls_old[j]);
          d += ")";
        }
        d += "]";
      }
    }
    return d;
  }
};

inline bool needs_topk(int p) { return p == p_tropd_c || p == p_tropd_c_clamp || p == p_tropd_p || p == p_fkl_raw || p == p_eopd; }
inline bool stochastic(int p) { return p == p_tropd_c || p == p_tropd_c_clamp || p == p_tropd_p || p == p_fkl_raw; }
inline bool needs_hs(int p) { return p == p_reopold || p == p_entropy_opd; }
inline bool needs_ht(int p) { return p == p_eopd; }

/// The documented domain of every parameter the case sets.
inline bool params_ok(const cfg& c) {
  auto fin = [](double x) { return std::isfinite(x); };
  const tropd::aggregation::mode m = static_cast<tropd::aggregation::mode>(c.agg);
  if (!(c.normaliser >= 0) || !fin(c.normaliser)) return false;
  if (m == tropd::aggregation::mode::sum_over_constant && !(c.constant > 0 && fin(c.constant))) return false;
  const bool guided = c.preset == p_tropd_c || c.preset == p_tropd_c_clamp || c.preset == p_tropd_p || c.preset == p_clip_outlier ||
                      c.preset == p_mask_outlier;
  if (guided && (!(c.beta >= 0) || !fin(c.beta))) return false;
  switch (c.preset) {
    case p_opd_clip: return c.eps_low >= 0 && c.eps_high >= 0 && (c.dual == 0 || c.dual > 1);
    case p_tropd_c:
    case p_tropd_p: return c.k >= 1;
    case p_tropd_c_clamp: return c.k >= 1 && c.clamp > 0;
    case p_fkl_raw: return c.k >= 1;
    case p_clip_outlier: return fin(c.tau);
    case p_mask_outlier: return !std::isnan(c.tau);
    case p_eopd: return c.k >= 1 && c.tau >= 0 && c.eps_low >= 0 && c.eps_high >= 0;
    case p_reopold: return c.switch_step >= 0 && c.fraction > 0 && c.fraction <= 1 && !std::isnan(c.floor - 1e-12);
    case p_entropy_opd: return c.fraction > 0 && c.fraction <= 1;
    case p_gopd: return fin(c.lambda);
    default: return true;
  }
}

/// The naive description of the case's objective (region::given for the stochastic ones).
inline no::objective naive_of(const cfg& c) {
  no::objective o;
  switch (c.preset) {
    case p_opd: o = no::opd(); break;
    case p_opd_clip: {
      no::pg_clip pc;
      pc.eps_low = c.eps_low;
      pc.eps_high = c.eps_high;
      pc.dual_c = c.dual;
      o = no::opd(pc);
      break;
    }
    case p_tropd_c: o = no::tropd(c.beta, true); break;
    case p_tropd_c_clamp: o = no::tropd(c.beta, true, c.clamp); break;
    case p_tropd_p: o = no::tropd(c.beta, false); break;
    case p_fkl_raw: o = no::fkl_outlier(true, no::inf, no::tail::raw); break;
    case p_clip_outlier: o = no::clip_outlier(c.tau, c.beta); break;
    case p_mask_outlier: o = no::mask_outlier(c.tau, c.beta); break;
    case p_eopd: o = no::eopd(c.tau, c.eps_low, c.eps_high); break;
    case p_reopold: {
      o = no::reopold(c.floor, c.switch_step, static_cast<long long>(c.step), c.fraction);
      // The library's phase I keeps R > floor - 1e-12 (documented in presets::reopold).
      if (static_cast<long long>(c.step) < c.switch_step) {
        o.reg = no::region::ratio_above;
        o.tau = static_cast<ld>(c.floor - 1e-12);
      }
      break;
    }
    case p_entropy_opd: o = no::entropy_opd(c.fraction); break;
    case p_vopd: o = no::vopd(); break;
    case p_gopd: o = no::gopd(c.lambda); break;
    default: o = no::gkd(); break;
  }
  o.guidance_pg = c.guidance_pg;
  o.how = static_cast<no::agg>(c.agg);
  o.normaliser = c.normaliser;
  o.constant = c.constant;
  return o;
}

/// The first bad value of token i (check order of docs/robustness.md), or ok.
inline tropd::status token_issue(const cfg& c, int i) {
  using tropd::make_error;
  const size_t u = static_cast<size_t>(i);
  const uint8_t f = c.from[u];
  if (f == 0) return {};
  auto bad = [](float x, bool allow_neg_inf) { return std::isnan(x) || x == finf || (!allow_neg_inf && x == -finf); };
  if (!std::isfinite(c.s[u])) return make_error(errc::non_finite_input, "", i);
  if (c.s[u] > 1e-4f) return make_error(errc::invalid_parameter, "", i);
  if (bad(c.t[u], true)) return make_error(errc::non_finite_input, "", i);
  if (c.t[u] > 1e-4f) return make_error(errc::invalid_parameter, "", i);
  if (c.has_s_old && !std::isfinite(c.s_old[u])) return make_error(errc::non_finite_input, "", i);
  if (c.has_hs && bad(c.hs[u], false)) return make_error(errc::non_finite_input, "", i);
  if (c.has_ht && bad(c.ht[u], false)) return make_error(errc::non_finite_input, "", i);
  // A per-position KL may be +inf (a support mismatch; C3, fixed): only NaN and -inf are bad.
  if (c.has_rkl && (std::isnan(c.rkl[u]) || c.rkl[u] == -finf)) return make_error(errc::non_finite_input, "", i);
  if (c.has_ref && bad(c.ref[u], true)) return make_error(errc::non_finite_input, "", i);
  if (needs_topk(c.preset) && f == 2) {
    for (int k = 0; k < c.K; ++k) {
      const size_t j = static_cast<size_t>(i * c.K + k);
      if (bad(c.lq[j], true)) return make_error(errc::non_finite_input, "", i, k);
      if (c.lq[j] == -finf) continue;
      if (bad(c.ls[j], true)) return make_error(errc::non_finite_input, "", i, k);
      if (c.has_ls_old && bad(c.ls_old[j], true)) return make_error(errc::non_finite_input, "", i, k);
    }
  }
  return {};
}

template <class Obj>
void run_with(const Obj& obj, const cfg& c) {
  const int n = c.n, K = c.K;
  // Views (faults applied).
  tropd::token_batch b;
  std::vector<origin> from(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) from[static_cast<size_t>(i)] = static_cast<origin>(c.from[static_cast<size_t>(i)]);
  const index_t nn = c.fault == f_empty ? 0 : n;
  b.s = {c.s.data(), nn};
  b.t = {c.t.data(), c.fault == f_t_size ? nn - 1 : nn};
  b.from = {from.data(), nn};
  std::vector<index_t> off = c.off;
  if (c.fault == f_off_end) off.back() = n + 1;
  if (c.fault == f_off_decreasing && off.size() > 2) std::swap(off[1], off[2]);
  if (c.fault == f_empty) off = {0, 0};
  b.seq_offsets = {off.data(), static_cast<index_t>(off.size())};
  std::vector<uint64_t> seq_ids = c.seq_ids;
  if (c.fault == f_seq_ids) seq_ids.push_back(99);
  if (c.has_seq_ids || c.fault == f_seq_ids) b.seq_ids = {seq_ids.data(), static_cast<index_t>(seq_ids.size())};
  if (c.has_s_old) b.s_old = {c.s_old.data(), nn};
  if (c.has_hs) b.student_entropy = {c.hs.data(), nn};
  if (c.has_ht) b.teacher_entropy = {c.ht.data(), nn};
  if (c.has_rkl) b.rkl = {c.rkl.data(), nn};
  if (c.has_ref) b.ref = {c.ref.data(), nn};
  const index_t Kc = c.fault == f_topk_cols ? K - 1 : K;
  if (K > 0) {
    b.topk_ids = {c.ids.data(), nn, K, K};
    b.topk_teacher = {c.lq.data(), nn, Kc, K};
    b.topk_student = {c.ls.data(), nn, K, K};
    if (c.has_ls_old) b.topk_student_old = {c.ls_old.data(), nn, K, K};
  }
  // Outputs, poisoned.
  std::vector<float> ds(static_cast<size_t>(n + 1), poison<float>()), adv(static_cast<size_t>(n), poison<float>()),
      gk(static_cast<size_t>(n * std::max(K, 1)), poison<float>());
  std::vector<uint8_t> fl(static_cast<size_t>(n), poison<uint8_t>());
  tropd::token_outputs out;
  if (c.want_ds) out.dloss_ds = {ds.data(), c.fault == f_out_size ? nn + 1 : nn};
  if (c.want_adv) out.advantage = {adv.data(), nn};
  if (c.want_topk && K > 0) out.dloss_dtopk = {gk.data(), nn, K, K};
  out.flags = {fl.data(), nn};
  double loss = poison<double>();
  tropd::diagnostics diag;
  diag.n_masked_input = -12345;
  tropd::host::eval_options eo;
  eo.seed = c.seed;
  eo.step = c.step;
  eo.bad_input = c.mask ? tropd::host::input_policy::mask : tropd::host::input_policy::reject;
  out.loss = &loss;
  out.diag = &diag;
  const tropd::status st = tropd::host::evaluate_tokens(obj, b, out, eo);

  note_outcome(st);
  auto untouched = [&] {
    return all_poison(ds) && all_poison(adv) && all_poison(gk) && all_poison(fl) && is_poison(loss) && diag.n_masked_input == -12345;
  };
  auto expect_error = [&](const error_outcome& e) { judge_error(st, e, untouched()); };

  // ---- Structure.
  if (c.preset == p_gkd) return expect_error({errc::unsupported, -1, -1, ""});
  if (!params_ok(c)) return expect_error({errc::invalid_parameter, -1, -1, ""});
  if (c.fault == f_empty) return expect_error({errc::empty_batch, -1, -1, ""});
  if (c.fault == f_t_size) return expect_error({errc::shape_mismatch, -1, -1, ""});
  if (off.size() < 2 || off.front() != 0 || off.back() != n) return expect_error({errc::shape_mismatch, -1, -1, ""});
  for (size_t j = 1; j < off.size(); ++j)
    if (off[j] < off[j - 1]) return expect_error({errc::shape_mismatch, static_cast<index_t>(j), -1, ""});
  if (c.fault == f_seq_ids) return expect_error({errc::shape_mismatch, -1, -1, ""});
  for (int i = 0; i < n; ++i)
    if (c.from[static_cast<size_t>(i)] > 2) return expect_error({errc::invalid_parameter, i, -1, ""});
  if (needs_hs(c.preset) && !c.has_hs) return expect_error({errc::unsupported, -1, -1, ""});
  if (needs_ht(c.preset) && !c.has_ht) return expect_error({errc::unsupported, -1, -1, ""});
  if (c.preset == p_vopd && !c.has_rkl) return expect_error({errc::unsupported, -1, -1, ""});
  if (c.preset == p_gopd && !c.has_ref) return expect_error({errc::unsupported, -1, -1, ""});
  if (needs_topk(c.preset) && (K < 1 || c.fault == f_topk_cols)) return expect_error({errc::shape_mismatch, -1, -1, ""});
  // Top-k ids are structure (issue P1, fixed): on student tokens, a negative or repeated id
  // among the non-padding entries is an error under either input policy.
  if (needs_topk(c.preset))
    for (int i = 0; i < n; ++i) {
      if (c.from[static_cast<size_t>(i)] != 2) continue;
      for (int k = 0; k < K; ++k) {
        const size_t j = static_cast<size_t>(i * K + k);
        if (c.lq[j] == -finf) continue;
        if (c.ids[j] < 0) return expect_error({errc::id_out_of_range, i, k, ""});
        for (int q = 0; q < k; ++q)
          if (c.lq[static_cast<size_t>(i * K + q)] != -finf && c.ids[static_cast<size_t>(i * K + q)] == c.ids[j])
            return expect_error({errc::duplicate_topk_id, i, k, ""});
      }
    }
  // The objective's k must be the lists' width (never silently ignored).
  if (needs_topk(c.preset) && K != c.k) return expect_error({errc::invalid_parameter, -1, -1, ""});
  if (c.fault == f_out_size && c.want_ds) return expect_error({errc::shape_mismatch, -1, -1, ""});

  // ---- Values: reject names the first bad token; mask turns bad tokens into prompt tokens.
  std::vector<uint8_t> eff = c.from;
  index_t n_masked = 0;
  for (int i = 0; i < n; ++i) {
    const tropd::status ti = token_issue(c, i);
    if (ti.ok()) continue;
    if (!c.mask) return expect_error({ti.code, ti.row, ti.col, ""});
    eff[static_cast<size_t>(i)] = 0;
    ++n_masked;
  }

  // ---- Region decisions (the stochastic ones from Philox, keyed as documented).
  std::vector<char> given(static_cast<size_t>(n), 0);
  if (stochastic(c.preset)) {
    for (int j = 0; j + 1 < static_cast<int>(c.off.size()); ++j)
      for (index_t i = c.off[static_cast<size_t>(j)]; i < c.off[static_cast<size_t>(j) + 1]; ++i) {
        const size_t u = static_cast<size_t>(i);
        if (eff[u] != 2) continue;
        const double R = double(c.t[u]) - (c.has_s_old ? double(c.s_old[u]) : double(c.s[u]));
        const tropd::draw_key key{c.seed, c.step, c.has_seq_ids ? c.seq_ids[static_cast<size_t>(j)] : static_cast<uint64_t>(j),
                                  static_cast<uint64_t>(i - c.off[static_cast<size_t>(j)]), tropd::streams::trust_region};
        given[u] = (R >= 0 || tropd::log_uniform(key) <= R) ? 1 : 0;
      }
  }

  // ---- Reference.
  const no::objective nobj = naive_of(c);
  no::batch nb;
  for (auto o : c.off) nb.offsets.push_back(static_cast<size_t>(o));
  for (int i = 0; i < n; ++i) {
    const size_t u = static_cast<size_t>(i);
    no::token x;
    x.from = eff[u] == 0 ? no::who::prompt : (eff[u] == 1 ? no::who::teacher : no::who::student);
    x.s = c.s[u];
    x.s_old = c.has_s_old ? c.s_old[u] : c.s[u];
    x.t = c.t[u];
    if (c.has_hs) x.ent_s = c.hs[u];
    if (c.has_ht) x.ent_t = c.ht[u];
    if (c.has_rkl) x.rkl = c.rkl[u];
    if (c.has_ref) x.ref = c.ref[u];
    if (needs_topk(c.preset)) {
      // Renormalised lists are shifted by their maximum (the renormalised distribution is
      // unchanged) so the naive code's plain sum of e^lq neither overflows nor underflows.
      ld shift = 0;
      if (c.preset != p_fkl_raw) {
        shift = -ldinf;
        for (int k = 0; k < K; ++k)
          if (std::isfinite(c.lq[static_cast<size_t>(i * K + k)])) shift = std::max<ld>(shift, c.lq[static_cast<size_t>(i * K + k)]);
        if (!std::isfinite(shift)) shift = 0;
      }
      for (int k = 0; k < K; ++k) {
        const size_t j = static_cast<size_t>(i * K + k);
        x.ids.push_back(c.ids[j]);
        x.lq.push_back(c.lq[j] == -finf ? -ldinf : ld(c.lq[j]) - shift);
        x.ls.push_back(c.lq[j] == -finf ? 0 : c.ls[j]);
        if (c.has_ls_old) x.ls_old.push_back(c.lq[j] == -finf ? 0 : c.ls_old[j]);
      }
    }
    nb.tok.push_back(x);
  }
  // Reference decisions for the error scan (naive::decide for the deterministic regions).
  const std::vector<char> dec = no::decide(nobj, nb, given);

  // Expected per-token errors, first in token order, in the order the per-token rule meets
  // them: the trust term (an advantage that is NaN, or a clipped surrogate, dL/ds or
  // advantage that leaves double's range), then the outlier term (top-k list errors, then
  // the same finiteness of a PG outlier term).
  const bool renorm = c.preset != p_fkl_raw;
  constexpr ld dmax = std::numeric_limits<double>::max();
  // Tokens whose terms are finite but pass through rho = e^(s - s_old) beyond double's range:
  // an error there is accepted too (the library forms rho in double).
  std::vector<int> soft;
  auto pg_bad = [&](ld A, const no::token& x, int i) {
    if (std::isnan(A)) return true;
    const no::pg_term p = no::pg(A, x.s, x.s_old, nobj.clip);
    if (!(std::fabs(p.A) <= dmax) || !(std::fabs(p.loss) <= dmax) || !(std::fabs(p.dlds) <= dmax)) return true;
    if (!(std::exp(x.s - x.s_old) <= dmax)) soft.push_back(i);
    return false;
  };
  // An expected error, or an infinite_divergence at an earlier "soft" token.
  auto expect_error_s = [&](const error_outcome& e) {
    for (int i : soft)
      if (!st.ok() && st.code == errc::infinite_divergence && st.row == i && (e.row == any_pos || i < e.row)) {
        if (!untouched()) fail("outputs written by a failed call");
        return;
      }
    expect_error(e);
  };
  for (int i = 0; i < n; ++i) {
    const size_t u = static_cast<size_t>(i);
    no::token& x = nb.tok[u];
    if (x.from == no::who::prompt) continue;
    if (x.from == no::who::teacher) {
      if (nobj.guidance_beta > 0 && nobj.guidance_pg && pg_bad(nobj.guidance_beta * (x.t - x.s_old), x, i))
        return expect_error_s({errc::infinite_divergence, i, -1, ""});
      continue;
    }
    if (dec[u] || nobj.additive) {
      ld A = 0;
      switch (nobj.tr) {
        case no::trust::k1: A = x.t - x.s_old; break;
        case no::trust::vopd: A = x.t - x.s_old + x.rkl; break;
        case no::trust::gopd: A = nobj.gopd_lambda * (x.t - x.ref) - (x.s_old - x.ref); break;
        case no::trust::none: break;
      }
      if (nobj.tr != no::trust::none && pg_bad(A, x, i)) return expect_error_s({errc::infinite_divergence, i, -1, ""});
      // A = -inf under a finite advantage floor (REOPOLD) is the floor: the naive rule
      // refuses a non-finite A before clipping, so give it a finite reward below the floor.
      if (A == -no::inf && std::isfinite(nobj.clip.adv_lo) && nobj.tr == no::trust::k1) x.t = x.s_old + nobj.clip.adv_lo - 1;
    }
    if (dec[u]) continue;
    if (nobj.out == no::outlier::clip_reward) {
      if (pg_bad(std::max(x.t - x.s_old, nobj.clip_tau), x, i)) return expect_error_s({errc::infinite_divergence, i, -1, ""});
    }
    if (nobj.out == no::outlier::fkl_c || nobj.out == no::outlier::fkl_p) {
      const std::vector<ld>& lsx = (nobj.out == no::outlier::fkl_c && !x.ls_old.empty()) ? x.ls_old : x.ls;
      int zero_at = -1;
      ld SK = 0, lqmax = -no::inf;
      for (int k = 0; k < K; ++k) {
        const size_t kk = static_cast<size_t>(k);
        if (x.lq[kk] == -no::inf) continue;
        SK += std::exp(x.lq[kk]);
        lqmax = std::max(lqmax, x.lq[kk]);
        if (lsx[kk] == -no::inf && zero_at < 0) zero_at = k;
      }
      if (zero_at >= 0) return expect_error_s({errc::infinite_divergence, i, zero_at, ""});
      if (lqmax == -no::inf) return expect_error_s({errc::invalid_topk_list, i, -1, ""});
      if (!renorm && SK > 1 + 1e-4L) return expect_error_s({errc::invalid_topk_list, i, -1, ""});
      if (nobj.out == no::outlier::fkl_c) {
        const no::fkl_value f = no::topk_fkl(x.lq, lsx, nobj.fkl_tail);
        ld A = -f.value;
        if (A < -nobj.fkl_clamp) A = -nobj.fkl_clamp;
        if (pg_bad(A, x, i)) return expect_error_s({errc::infinite_divergence, i, -1, ""});
      }
    }
    const no::token_result tr = no::token_rule(nobj, x, dec[u] != 0);
    if (tr.error) return expect_error_s({errc::infinite_divergence, i, any_pos, ""});
  }
  const no::result ref = no::evaluate(nobj, nb, given);

  // ---- Range of the fp32 outputs (documented in host/objective.hpp, check_output_range):
  // before anything is written, a token whose 2 (|w dL/ds| + sum_k |w dL/dlog p_k|), |A| or
  // |L_i| exceeds FLT_MAX fails the call (infinite_divergence at that token). Within 1e-6 of
  // the limit either answer is accepted. The limit is that of the narrowest per-token output
  // the call requested (token_stages.hpp, output_limit): FLT_MAX when an fp32 output (dL/ds,
  // advantage, top-k gradient) is requested, else DBL_MAX (only the loss and the flags).
  const bool fp32_outputs = c.want_ds || c.want_adv || (c.want_topk && K > 0);
  const ld fmax = fp32_outputs ? ld(std::numeric_limits<float>::max()) : dmax;
  int range_strict = -1;
  std::vector<int> range_maybe;
  for (int i = 0; i < n; ++i) {
    const no::token_result& r = ref.tok[static_cast<size_t>(i)];
    const ld w = ref.w[static_cast<size_t>(i)];
    ld mag = std::fabs(w * r.dlds);
    for (ld g : r.g) mag += std::fabs(w * g);
    const ld worst = std::max({2 * mag, std::fabs(r.adv), std::fabs(r.loss)});
    if (std::isnan(worst) || worst > fmax * (1 + 1e-6L)) {
      if (range_strict < 0) range_strict = i;
    } else if (worst > fmax * (1 - 1e-6L)) {
      range_maybe.push_back(i);
    }
  }
  const bool overflow = range_strict >= 0 || !(std::fabs(ref.loss) <= dmax);
  if (!st.ok()) {
    bool ok_error = st.code == errc::infinite_divergence &&
                    (st.row == range_strict || std::find(soft.begin(), soft.end(), int(st.row)) != soft.end() ||
                     std::find(range_maybe.begin(), range_maybe.end(), int(st.row)) != range_maybe.end());
    if (range_strict >= 0 && st.row > range_strict) ok_error = false;
    if (!ok_error && range_strict < 0 && !(std::fabs(ref.loss) <= dmax) && st.code == errc::infinite_divergence) ok_error = true;
    if (ok_error) {
      if (!untouched()) fail("outputs written by a failed call");
      return;
    }
    fail(cat("expected ", range_strict >= 0 ? cat("infinite divergence at token ", range_strict, " (fp32 output range)") : std::string("a result"),
             ", got ", status_str(st)));
  }
  if (range_strict >= 0) fail(cat("ok result although token ", range_strict, "'s outputs exceed fp32"), "B4");
  // ---- Compare.
  auto known_if_overflow = [&] { return overflow ? std::string("B4") : std::string(); };
  // Rounding scale of each token: the magnitudes of its inputs (double arithmetic on float
  // inputs cancels to absolute errors ~ 1e-16 of them), times the importance ratio.
  std::vector<ld> tmag(static_cast<size_t>(n), 1);
  for (int i = 0; i < n; ++i) {
    const size_t u = static_cast<size_t>(i);
    const no::token& x = nb.tok[u];
    ld m = 1;
    for (ld v : {x.s, x.s_old, x.t}) m += std::isfinite(v) ? std::fabs(v) : 0;
    for (const auto* vv : {&x.lq, &x.ls, &x.ls_old})
      for (ld v : *vv) m += std::isfinite(v) ? std::fabs(v) : 0;
    tmag[u] = m * std::max<ld>(1, std::exp(x.s - x.s_old)) + std::fabs(ref.tok[u].loss) + std::fabs(ref.tok[u].dlds);
  }
  ld mag = 0;
  for (int i = 0; i < n; ++i)
    if (ref.w[static_cast<size_t>(i)] != 0) mag += std::fabs(ref.w[static_cast<size_t>(i)]) * tmag[static_cast<size_t>(i)];
  const ld tol_loss = 1e-12L * (1 + mag);
  // Tokens whose top-k log-probs are so large in magnitude that double cannot renormalise
  // them (|lq| > 1e12: lq - log S_K loses the O(1) part): values not compared, only finiteness.
  std::vector<char> imprecise(static_cast<size_t>(n), 0);
  bool any_imprecise = false;
  for (int i = 0; i < n; ++i) {
    for (int k = 0; k < K && needs_topk(c.preset); ++k) {
      const float v = c.lq[static_cast<size_t>(i * K + k)];  // (unshifted)
      if (std::isfinite(v) && std::fabs(v) > 1e12f) imprecise[static_cast<size_t>(i)] = 1;
    }
    if (imprecise[static_cast<size_t>(i)] && ref.w[static_cast<size_t>(i)] != 0) any_imprecise = true;
  }
  judge_value("loss", loss, ref.loss, tol_loss, !overflow && !any_imprecise, known_if_overflow());
  const ld epsf = std::numeric_limits<float>::epsilon(), minf = std::numeric_limits<float>::min();
  auto ftol = [&](ld x) { return 2 * epsf * std::fabs(x) + 1e-11L * std::fabs(x) + 2 * minf; };
  for (int i = 0; i < n; ++i) {
    const size_t u = static_cast<size_t>(i);
    const no::token_result& r = ref.tok[u];
    const ld w = ref.w[u];
    const bool compare = !overflow && !imprecise[u];
    if (c.want_ds)
      judge_value(cat("token ", i, ": dL/ds"), ds[u], w * r.dlds, ftol(w * r.dlds) + (w != 0 ? 1e-13L * std::fabs(w) * tmag[u] : 0), compare,
                  known_if_overflow());
    if (c.want_adv) judge_value(cat("token ", i, ": advantage"), adv[u], r.adv, ftol(r.adv) + 1e-13L * tmag[u], compare, known_if_overflow());
    if (c.want_topk && K > 0)
      for (int k = 0; k < K; ++k) {
        const ld gr = (needs_topk(c.preset) && !r.g.empty()) ? w * r.g[static_cast<size_t>(k)] : 0;
        judge_value(cat("token ", i, " entry ", k, ": top-k gradient"), gk[static_cast<size_t>(i * K + k)], gr,
                    ftol(gr) + (w != 0 ? 1e-13L * std::fabs(w) * tmag[u] : 0), compare, known_if_overflow());
      }
    // Flags: region, kept, counted, guidance bits.
    namespace F = tropd::flags;
    const uint8_t want = static_cast<uint8_t>((r.trusted ? F::trusted : 0) | (r.outlier ? F::outlier : 0) | (r.kept ? F::kept : 0) |
                                              (r.counted ? F::counted : 0) | (r.guidance ? F::guidance : 0));
    const uint8_t mask_bits = F::trusted | F::outlier | F::kept | F::counted | F::guidance;
    if ((fl[u] & mask_bits) != want) fail(cat("token ", i, ": flags ", int(fl[u]), " vs reference bits ", int(want)));
  }
  // Diagnostics.
  index_t n_student = 0, n_trusted = 0, n_outlier = 0, n_counted = 0, n_kept = 0;
  for (int i = 0; i < n; ++i) {
    const no::token_result& r = ref.tok[static_cast<size_t>(i)];
    n_student += nb.tok[static_cast<size_t>(i)].from == no::who::student;
    n_trusted += r.trusted;
    n_outlier += r.outlier;
    n_counted += r.counted;
    n_kept += r.kept;
  }
  if (diag.n_masked_input != n_masked) fail(cat("n_masked_input ", diag.n_masked_input, " vs ", n_masked));
  if (diag.n_student != n_student || diag.n_trusted != n_trusted || diag.n_outlier != n_outlier || diag.n_counted != n_counted ||
      diag.n_kept != n_kept)
    fail(cat("diagnostic counts (student, trusted, outlier, counted, kept) = (", diag.n_student, ", ", diag.n_trusted, ", ", diag.n_outlier,
             ", ", diag.n_counted, ", ", diag.n_kept, ") vs (", n_student, ", ", n_trusted, ", ", n_outlier, ", ", n_counted, ", ", n_kept, ")"));
  if (!close(diag.normaliser, ref.normaliser, 1e-12L * (1 + ref.normaliser)))
    fail(cat("normaliser ", diag.normaliser, " vs ", static_cast<double>(ref.normaliser)));
  if (overflow) fail("ok result where an output overflows", "B4");
}

inline void run(const cfg& c) {
  using tropd::aggregation::mode;
  auto common = [&](auto o) {
    o.agg.how = static_cast<mode>(c.agg);
    o.agg.normaliser = c.normaliser;
    o.agg.constant = c.constant;
    if (c.guidance_pg) o.guidance = tropd::guidance_form::pg;
    return o;
  };
  switch (c.preset) {
    case p_opd: return run_with(common(presets::opd()), c);
    case p_opd_clip: {
      tropd::clippers::pg_clip pc;
      pc.eps_low = c.eps_low;
      pc.eps_high = c.eps_high;
      pc.dual_c = c.dual;
      return run_with(common(presets::opd({.clip = pc})), c);
    }
    case p_tropd_c: return run_with(common(presets::tropd({.beta = c.beta, .k = c.k})), c);
    case p_tropd_c_clamp: return run_with(common(presets::tropd({.beta = c.beta, .k = c.k, .form = tropd::outliers::fkl_form::c, .clamp = c.clamp})), c);
    case p_tropd_p: return run_with(common(presets::tropd({.beta = c.beta, .k = c.k, .form = tropd::outliers::fkl_form::p})), c);
    case p_fkl_raw: {
      auto o = presets::fkl_outlier({.k = c.k});
      o.outlier.fkl.tail = tropd::estimators::topk_tail::raw;
      return run_with(common(o), c);
    }
    case p_clip_outlier: return run_with(common(presets::clip_outlier({.tau = c.tau, .guidance_beta = c.beta})), c);
    case p_mask_outlier: return run_with(common(presets::mask_outlier({.tau = c.tau, .guidance_beta = c.beta})), c);
    case p_eopd: return run_with(common(presets::eopd({.tau = c.tau, .k = c.k, .eps_low = c.eps_low, .eps_high = c.eps_high})), c);
    case p_reopold: return run_with(common(presets::reopold({.floor = c.floor, .switch_step = c.switch_step, .entropy_fraction = c.fraction})), c);
    case p_entropy_opd: return run_with(common(presets::entropy_opd({.fraction = c.fraction})), c);
    case p_vopd: return run_with(common(presets::vopd()), c);
    case p_gopd: return run_with(common(presets::gopd({.lambda = c.lambda})), c);
    default: return run_with(common(presets::gkd()), c);
  }
}

inline float logprob(input& in, bool allow_neg_inf, bool specials) {
  bool real = false;
  const uint8_t b = in.u8(&real);
  if (real && specials && b >= 244) {
    switch (b) {
      case 244: return std::numeric_limits<float>::quiet_NaN();
      case 245: return finf;
      case 246: return 0.5f;      // positive: not a log-probability
      case 247: return 5e-5f;     // positive within the 1e-4 tolerance
      case 248: return -1e30f;
      case 249: return -3e38f;
      case 250: return -800.0f;
      case 251: return 0.0f;
      default: break;
    }
  }
  if (b >= 232 && allow_neg_inf && (real || b >= 250)) return -finf;
  return -static_cast<float>(b % 232) / 23.0f;  // [0, -10]
}

inline cfg decode(input& in) {
  cfg c;
  c.preset = in.pick(n_preset);
  static const double betas[] = {1e-3, 1e-3, 0.1, 0, 1, -1e-3, std::numeric_limits<double>::quiet_NaN(), dinf};
  c.beta = in.from(betas);
  static const double taus[] = {-2, -0.5, -5, 0, 0.8, -dinf, std::numeric_limits<double>::quiet_NaN(), 3};
  c.tau = in.from(taus);
  static const double clamps[] = {5, 1, 0.1, 50, 0, -1, std::numeric_limits<double>::quiet_NaN(), dinf};
  c.clamp = in.from(clamps);
  // k_width: the lists' width K (decided below): the library requires k = K at token level,
  // so most cases take it; the others exercise the mismatch error and invalid k.
  constexpr int k_width = 1 << 20;
  static const int ks[] = {k_width, k_width, k_width, 64, 1, 0, -3, k_width};
  c.k = in.from(ks);
  static const double fracs[] = {0.2, 0.5, 1, 0.01, 0, 1.5, std::numeric_limits<double>::quiet_NaN(), 0.3};
  c.fraction = in.from(fracs);
  static const double lambdas[] = {1.25, 1, 0, -2, std::numeric_limits<double>::quiet_NaN(), dinf, 2, 1.25};
  c.lambda = in.from(lambdas);
  static const double floors[] = {-3, -1, -0.5, -10, -3, -dinf, std::numeric_limits<double>::quiet_NaN(), -2};
  c.floor = in.from(floors);
  static const double epss[] = {0.2, 0.28, 0.1, 0, 0.2, -0.1, std::numeric_limits<double>::quiet_NaN(), dinf};
  c.eps_low = in.from(epss);
  c.eps_high = in.from(epss);
  static const double duals[] = {3, 0, 3, 1.5, 1, 0.5, 10, 3};
  c.dual = in.from(duals);
  static const long long switches[] = {10, 0, 1000, -1};
  c.switch_step = in.from(switches);
  c.guidance_pg = in.pick(4) == 0;
  c.agg = in.pick(5);
  static const double norms[] = {0, 0, 0, 7, 0.5, -1, std::numeric_limits<double>::quiet_NaN(), 1e6};
  c.normaliser = in.from(norms);
  static const double consts[] = {1, 1, 4, 0, -1, 1e-3, std::numeric_limits<double>::quiet_NaN(), 100};
  c.constant = in.from(consts);
  c.mask = in.bit();
  c.seed = in.u8();
  static const uint64_t steps[] = {0, 1, 5, 10, 11, 999, 1000, 1ull << 40};
  c.step = in.from(steps);
  const uint8_t fb = in.u8();
  c.fault = fb >= 240 ? 1 + (fb - 240) % (n_fault - 1) : f_none;
  const uint8_t outs = in.u8();
  c.want_ds = (outs & 1) == 0 || (outs & 2) == 0;
  c.want_adv = (outs & 4) == 0 || (outs & 8) == 0;
  c.want_topk = (outs & 16) == 0;

  // Batch.
  c.n = 1 + in.pick(12);
  c.n_seq = 1 + in.pick(4);
  c.off.push_back(0);
  for (int j = 1; j < c.n_seq; ++j) c.off.push_back(std::max<index_t>(c.off.back(), in.pick(c.n + 1)));
  c.off.push_back(c.n);
  c.has_seq_ids = in.bit();
  for (int j = 0; j < c.n_seq; ++j) c.seq_ids.push_back(static_cast<uint64_t>(in.u8()) * 1000003ull);
  const bool specials = in.pick(3) == 0;
  c.has_s_old = in.bit();
  const uint8_t sup = in.u8();
  c.has_hs = needs_hs(c.preset) ? (sup & 1) || (sup & 2) : (sup & 4) && (sup & 8);
  c.has_ht = needs_ht(c.preset) ? (sup & 1) || (sup & 16) : (sup & 4) && (sup & 32);
  c.has_rkl = c.preset == p_vopd ? (sup & 1) || (sup & 64) : (sup & 4) && (sup & 128);
  c.has_ref = c.preset == p_gopd ? (sup & 1) || (sup & 2) : (sup & 4) && (sup & 16);
  const double p_neg_inf_t = in.pick(3) == 0 ? 0.3 : 0.0;
  c.K = (needs_topk(c.preset) || in.pick(4) == 0) ? 1 + in.pick(6) : 0;
  if (c.k == k_width) c.k = c.K > 0 ? c.K : 4;
  c.has_ls_old = in.bit();
  for (int i = 0; i < c.n; ++i) {
    bool real = false;
    const uint8_t ob = in.u8(&real);
    uint8_t tag = ob < 64 ? 0 : (ob < 112 ? 1 : 2);
    if (real && ob == 255 && specials) tag = 3;  // not an origin
    c.from.push_back(tag);
    const float s = logprob(in, false, specials);
    c.s.push_back(s);
    float t = logprob(in, true, specials);
    if (in.u8() < p_neg_inf_t * 256) t = -finf;
    c.t.push_back(t);
    static const float deltas[] = {0, 0, 0.1f, -0.2f, 0.5f, -1, 3, -3, 30, -30, 100, -100, 800};
    const float d = in.from(deltas);
    float so = s + d;
    {
      bool r2 = false;
      const uint8_t sb = in.u8(&r2);
      if (r2 && specials && sb >= 250) so = sb == 250 ? std::numeric_limits<float>::quiet_NaN() : (sb == 251 ? finf : (sb == 252 ? -finf : -1e30f));
    }
    c.s_old.push_back(so);
    auto ent = [&] {
      bool r3 = false;
      const uint8_t eb = in.u8(&r3);
      if (r3 && specials && eb >= 253) return eb == 253 ? std::numeric_limits<float>::quiet_NaN() : (eb == 254 ? finf : -finf);
      return static_cast<float>(eb % 200) / 40.0f;
    };
    c.hs.push_back(ent());
    c.ht.push_back(ent());
    c.rkl.push_back(ent());
    c.ref.push_back(logprob(in, true, specials));
    // Top-k list: normalised from random logits over K + extra outcomes, or grid values.
    const bool grid = in.pick(4) == 0;
    std::vector<ld> raw;
    for (int k = 0; k < c.K; ++k) raw.push_back((in.pick(240) - 120) / 40.0L);
    const int extra = in.pick(3);
    ld m = -ldinf, sum = 0;
    for (ld x : raw) m = std::max(m, x);
    for (ld x : raw) sum += std::exp(x - m);
    sum += extra * std::exp(-m);
    for (int k = 0; k < c.K; ++k) {
      float lq = grid ? logprob(in, true, specials) : static_cast<float>(raw[static_cast<size_t>(k)] - m - std::log(sum));
      if (grid && specials && lq == 0.5f) lq = 2.0f;  // unnormalised
      bool r4 = false;
      const uint8_t pb = in.u8(&r4);
      if (pb >= 236 && (r4 || pb >= 250)) lq = -finf;  // padding
      c.lq.push_back(lq);
      const uint8_t ib = in.u8(&r4);
      int32_t id = static_cast<int32_t>(k * 5 + ib % 5);
      if (k > 0 && ib >= 200 && ib < 215) id = c.ids[static_cast<size_t>(i * c.K + (ib % k))];
      if (r4 && ib >= 250) id = ib == 250 ? -1 : (ib == 251 ? INT_MIN : 1000000 + ib);
      c.ids.push_back(id);
      const float lsv = logprob(in, true, specials);
      c.ls.push_back(lsv);
      c.ls_old.push_back(lsv + static_cast<float>(in.pick(5) - 2) * 0.25f);
    }
  }
  if (c.fault == f_origin_tag) c.from[static_cast<size_t>(in.pick(c.n))] = 3;
  return c;
}

inline result check(const uint8_t* data, size_t size) {
  input in(data, size);
  const cfg c = decode(in);
  const std::string ctx = c.describe();
  return guarded([&] { run(c); }, &ctx);
}

}  // namespace tropd_fuzz::objective
