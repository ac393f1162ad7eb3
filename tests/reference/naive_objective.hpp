// tests/reference/naive_objective.hpp: a deliberately naive long-double reference for the
// composed distillation objectives (OPD, EOPD, REOPOLD, Entropy OPD, clip / mask / FKL
// outlier, TrOPD, vOPD, G-OPD, GKD), written from docs/method.md sections 3-8 and 10 alone
// (not from the library code).
//
// Everything is a plain loop in long double over a materialised batch of tokens. The
// stochastic trust region of TrOPD (method.md 4.2) is NOT re-implemented: its decisions are
// an input (`decisions`), so this file knows nothing about Philox. Deterministic regions
// (static log-ratio threshold, teacher-entropy gate, student-entropy top fraction) are
// computed here from their definitions.
//
// Nothing here includes a tropd header: the only shared vocabulary is plain numbers.
//
// Choices this reference makes where method.md leaves room (each one stated, so a test
// failure can be traced to a choice rather than to an error):
//   * A token is "counted" by token normalisers when the objective has a term for it: every
//     student-sampled token, and a teacher-prefix token when guidance (beta > 0) or a
//     full-vocabulary term (GKD) applies to it. Prompt tokens never count.
//   * A token is "kept" when some term contributes for it (method.md 5, REOPOLD's
//     normaliser): a trusted student token, an outlier whose handler gives it a term
//     (clipped reward, top-k FKL), a guidance token, a dense-term token.
//   * "Top fraction f of the batch's student tokens by entropy" keeps the ceil(f n) largest
//     entropies, ties with the last kept value included (f n is formed in floating point,
//     so a 1e-9 tolerance stops 0.2 * 10 = 2.0000000000000004 from rounding up to 3).
//   * PPO clipping (method.md 3): L = max(-rho A, -clip(rho, 1 - eps_low, 1 + eps_high) A),
//     then for A < 0 the dual clip L = min(L, -c A); dL/ds is -rho A where the unclipped
//     branch is the active one and 0 otherwise.
//   * An advantage clamp (REOPOLD's floor, pg_clip's adv_lo) applies before anything is
//     judged infinite: A = max(-inf, floor) = floor is a finite advantage (method.md 5).
//   * FKL outlier term, form C: A = -FKL_k evaluated with the rollout-time student
//     log-probs at the teacher's ids (the current ones when none are given), optionally
//     clamped A >= -c_max; form P: the loss FKL_k(current student) with the sparse gradient
//     dL/d ls_v = -qk_v at the teacher's ids (method.md 2.3, 4.3).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "reference/naive.hpp"

namespace tropd_test::naive_obj {

using naive::inf;
using naive::ld;
using naive::vec;

inline const ld nan_ld = std::numeric_limits<ld>::quiet_NaN();

/// Who produced a token (method.md 4.1: I[x ~ p_S], I[x ~ p_T]; plus prompt tokens).
enum class who { prompt, teacher, student };

/// One token of a batch, everything the objectives of method.md read.
struct token {
  who from = who::student;
  ld s = 0;       ///< current student log-prob of the token
  ld s_old = 0;   ///< rollout-time student log-prob (detached)
  ld t = 0;       ///< teacher log-prob (-inf: zero teacher mass)
  ld ent_s = nan_ld, ent_t = nan_ld;  ///< full-vocabulary entropies H_S, H_T
  ld rkl = nan_ld;  ///< detached per-position reverse KL (vOPD)
  ld ref = nan_ld;  ///< reference-model log-prob (G-OPD)
  std::vector<int> ids;  ///< teacher top-k ids (only used to chain gradients at row level)
  vec lq;      ///< teacher log-probs at the ids (-inf: padding)
  vec ls;      ///< current student log-probs at the ids
  vec ls_old;  ///< rollout-time student log-probs at the ids (empty: = ls)
};

/// A batch: tokens grouped into sequences by offsets [n_seq + 1].
struct batch {
  std::vector<token> tok;
  std::vector<size_t> offsets;
};

// ---------------------------------------------------------------------------
// Building blocks.
// ---------------------------------------------------------------------------

/// PG surrogate clipping (method.md 3): advantage clamp to [adv_lo, adv_hi], PPO ratio clip
/// with eps_low / eps_high (inf: off), dual clip constant dual_c (> 1; 0: off).
struct pg_clip {
  ld adv_lo = -inf, adv_hi = inf;
  ld eps_low = inf, eps_high = inf;
  ld dual_c = 0;
};

struct pg_term {
  ld A = 0;      ///< the advantage after the clamp
  ld loss = 0;   ///< surrogate value
  ld dlds = 0;   ///< d surrogate / ds
  bool adv_clipped = false, ratio_clipped = false;
};

/// L = -rho A (rho = exp(s - s_old)) with the clips of `c`, by case analysis:
/// PPO replaces rho by its clipped value exactly when (A > 0 and rho > 1 + eps_high) or
/// (A < 0 and rho < 1 - eps_low); the dual clip caps L at -c A for A < 0.
inline pg_term pg(ld A0, ld s, ld s_old, const pg_clip& c) {
  pg_term r;
  r.A = std::min(std::max(A0, c.adv_lo), c.adv_hi);
  r.adv_clipped = r.A != A0;
  const ld rho = std::exp(s - s_old);
  bool clipped = false;
  ld L = -rho * r.A;
  if (r.A > 0 && rho > 1 + c.eps_high) {
    L = -(1 + c.eps_high) * r.A;
    clipped = true;
  } else if (r.A < 0 && rho < 1 - c.eps_low) {
    L = -(1 - c.eps_low) * r.A;
    clipped = true;
  }
  if (c.dual_c > 1 && r.A < 0 && -c.dual_c * r.A < L) {
    L = -c.dual_c * r.A;
    clipped = true;
  }
  r.loss = L;
  r.dlds = clipped ? ld(0) : -rho * r.A;
  r.ratio_clipped = clipped;
  return r;
}

enum class tail { raw, renormalised };

struct fkl_value {
  ld value = 0;  ///< FKL_k
  vec g;         ///< dFKL_k / d ls at each list entry (0 at padding)
  ld SK = 0, PK = 0;  ///< teacher and student mass on the list
  bool finite = true;
};

/// Top-k forward KL on a teacher list (method.md 2.3): sum_{v in K} qk_v (log qk_v - ls_v),
/// qk = q (raw) or q / S_K (renormalised). -inf teacher entries are padding.
inline fkl_value topk_fkl(const vec& lq, const vec& ls, tail t) {
  fkl_value r;
  r.g.assign(lq.size(), 0);
  for (size_t i = 0; i < lq.size(); ++i) {
    if (lq[i] == -inf) continue;
    r.SK += std::exp(lq[i]);
    r.PK += std::exp(ls[i]);
  }
  const ld logS = std::log(r.SK);
  for (size_t i = 0; i < lq.size(); ++i) {
    if (lq[i] == -inf) continue;
    if (ls[i] == -inf) {
      r.finite = false;
      r.value = inf;
      return r;
    }
    const ld lqk = t == tail::renormalised ? lq[i] - logS : lq[i];
    const ld qk = std::exp(lqk);
    r.value += qk * (lqk - ls[i]);
    r.g[i] = -qk;
  }
  return r;
}

// ---------------------------------------------------------------------------
// The objective, as a plain description (method.md 3-8).
// ---------------------------------------------------------------------------

enum class region {
  all,              ///< every student token trusted (OPD, vOPD, G-OPD, GKD)
  ratio_above,      ///< trusted iff R > tau (mask / clip outlier)
  ratio_at_least,   ///< trusted iff R >= tau (REOPOLD phase I: keep R >= floor)
  teacher_entropy,  ///< trusted iff H_T <= tau (EOPD: H_T > tau gets the additive FKL)
  entropy_top,      ///< trusted iff H_S is among the top `fraction` of the batch (REOPOLD II, Entropy OPD)
  given,            ///< decisions passed in (the stochastic region of TrOPD)
};
enum class trust { k1, vopd, gopd, none };
enum class outlier { drop, clip_reward, fkl_c, fkl_p };
enum class agg { token_mean, kept_token_mean, seq_mean_token_mean, seq_mean_token_sum, sum_over_constant };

struct objective {
  region reg = region::all;
  ld tau = 0;                ///< region threshold (ratio_* and teacher_entropy)
  ld fraction = 0.2;         ///< entropy_top
  trust tr = trust::k1;
  ld gopd_lambda = 1.25;
  outlier out = outlier::drop;
  ld clip_tau = 0;           ///< clip_reward: A = max(R, clip_tau)
  tail fkl_tail = tail::renormalised;
  ld fkl_clamp = inf;        ///< form C: A >= -fkl_clamp
  ld fkl_weight = 1;         ///< multiplies the FKL outlier term (form C: the clamped advantage)
  bool additive = false;     ///< EOPD: outliers also get the trust term
  pg_clip clip{};
  ld guidance_beta = 0;      ///< off-policy guidance on teacher-prefix tokens
  bool guidance_pg = false;  ///< false: -beta s (SFT, method.md 10.3); true: A = beta (t - s_old)
  bool dense_jsd = false;    ///< GKD's full-vocabulary JSD (row level)
  ld jsd_beta = 0.5;
  ld dense_weight = 1;
  agg how = agg::token_mean;
  ld constant = 1;           ///< sum_over_constant
  ld normaliser = 0;         ///< > 0: external denominator
};

// ---------------------------------------------------------------------------
// Presets (method.md sections given with each).
// ---------------------------------------------------------------------------

/// OPD (3): A = R = t - s_old on every student token, token-mean, optional PPO / dual clip.
inline objective opd(pg_clip c = {}) {
  objective o;
  o.clip = c;
  return o;
}
/// EOPD (5): PPO-clipped K1 on every token plus I[H_T > tau] FKL_k (renormalised top-k, form P).
inline objective eopd(ld tau = 0.8L, ld eps_low = 0.2L, ld eps_high = 0.2L) {
  objective o;
  o.reg = region::teacher_entropy;
  o.tau = tau;
  o.out = outlier::fkl_p;
  o.additive = true;
  o.clip.eps_low = eps_low;
  o.clip.eps_high = eps_high;
  return o;
}
/// REOPOLD (5): A = max(R, floor), mean over kept tokens; phase I keeps R >= floor, phase
/// II (step >= switch_step) keeps the top `fraction` of tokens by student entropy.
inline objective reopold(ld floor, long long switch_step, long long step, ld fraction = 0.2L) {
  objective o;
  if (step < switch_step) {
    o.reg = region::ratio_at_least;
    o.tau = floor;
  } else {
    o.reg = region::entropy_top;
    o.fraction = fraction;
  }
  o.clip.adv_lo = floor;
  o.how = agg::kept_token_mean;
  return o;
}
/// Entropy OPD 20% (5): A = I[H_S in the batch's top fraction] R, token-mean.
inline objective entropy_opd(ld fraction = 0.2L) {
  objective o;
  o.reg = region::entropy_top;
  o.fraction = fraction;
  return o;
}
/// Clip outlier (4.3): A = max(R, tau), static tau < 0.
inline objective clip_outlier(ld tau, ld beta = 0) {
  objective o;
  o.reg = region::ratio_above;
  o.tau = tau;
  o.out = outlier::clip_reward;
  o.clip_tau = tau;
  o.guidance_beta = beta;
  return o;
}
/// Mask outlier (4.3): A = R if R > tau, else dropped.
inline objective mask_outlier(ld tau, ld beta = 0) {
  objective o;
  o.reg = region::ratio_above;
  o.tau = tau;
  o.guidance_beta = beta;
  return o;
}
/// FKL outlier (4.3): adaptive region (decisions given), A = R inside, top-k FKL outside
/// (form C by default, method.md 10.1; renormalised teacher top-k, 10.2).
inline objective fkl_outlier(bool form_c = true, ld clamp = inf, tail t = tail::renormalised) {
  objective o;
  o.reg = region::given;
  o.out = form_c ? outlier::fkl_c : outlier::fkl_p;
  o.fkl_clamp = clamp;
  o.fkl_tail = t;
  return o;
}
/// TrOPD (4.1): FKL outlier plus off-policy guidance -beta log p_S(x) on teacher-prefix tokens.
inline objective tropd(ld beta = 1e-3L, bool form_c = true, ld clamp = inf) {
  objective o = fkl_outlier(form_c, clamp);
  o.guidance_beta = beta;
  return o;
}
/// vOPD (6): A = R + KL_t (detached per-position reverse KL).
inline objective vopd() {
  objective o;
  o.tr = trust::vopd;
  return o;
}
/// G-OPD / ExOPD (6): A = lambda (t - t_ref) - (s_old - s_ref), one reference model.
inline objective gopd(ld lambda = 1.25L) {
  objective o;
  o.tr = trust::gopd;
  o.gopd_lambda = lambda;
  return o;
}
/// GKD (5, 2.2): full-vocabulary generalised JSD(beta) on every non-prompt token (row level).
inline objective gkd(ld beta = 0.5L) {
  objective o;
  o.tr = trust::none;
  o.dense_jsd = true;
  o.jsd_beta = beta;
  return o;
}

// ---------------------------------------------------------------------------
// Evaluation.
// ---------------------------------------------------------------------------

/// One token's unweighted terms and its classification.
struct token_result {
  ld loss = 0, loss_trust = 0, loss_outlier = 0, loss_guidance = 0;
  ld dlds = 0;  ///< dL_i / ds_i
  ld adv = 0;   ///< advantage after clipping (sum over the PG terms; 0 where none)
  vec g;        ///< dL_i / d ls at the top-k entries (form P), zeros otherwise
  bool trusted = false, outlier = false, kept = false, counted = false, guidance = false;
  bool adv_clipped = false, ratio_clipped = false;
  bool error = false;  ///< the term is infinite (e.g. a trusted token with t = -inf)
  ld SK = 0, PK = 0;   ///< top-k masses where a top-k term ran
};

struct result {
  std::vector<token_result> tok;
  vec w;             ///< aggregation weight of each token
  ld normaliser = 0;
  ld loss = 0, loss_trust = 0, loss_outlier = 0, loss_guidance = 0, loss_dense = 0;
  bool error = false;
};

/// Region decisions for every token (meaningful for student tokens). `given` holds the
/// decisions of region::given, one per token.
inline std::vector<char> decide(const objective& o, const batch& b, const std::vector<char>& given = {}) {
  const size_t n = b.tok.size();
  std::vector<char> m(n, 0);
  ld thr = inf;
  if (o.reg == region::entropy_top) {
    vec h;
    for (const token& x : b.tok)
      if (x.from == who::student) h.push_back(x.ent_s);
    if (!h.empty()) {
      std::sort(h.begin(), h.end(), [](ld a, ld c) { return a > c; });
      size_t keep = static_cast<size_t>(std::ceil(o.fraction * static_cast<ld>(h.size()) - 1e-9L));
      keep = std::clamp<size_t>(keep, 1, h.size());
      thr = h[keep - 1];
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const token& x = b.tok[i];
    if (x.from != who::student) continue;
    const ld R = x.t - x.s_old;
    switch (o.reg) {
      case region::all: m[i] = 1; break;
      case region::ratio_above: m[i] = R > o.tau; break;
      case region::ratio_at_least: m[i] = R >= o.tau; break;
      case region::teacher_entropy: m[i] = !(x.ent_t > o.tau); break;
      case region::entropy_top: m[i] = x.ent_s >= thr; break;
      case region::given: m[i] = given.at(i); break;
    }
  }
  return m;
}

/// The per-token rule (method.md 4.1 / 4.3 / 5 / 6) for one token given its decision.
inline token_result token_rule(const objective& o, const token& x, bool trusted) {
  token_result r;
  r.g.assign(x.lq.size(), 0);
  if (x.from == who::prompt) return r;
  if (x.from == who::teacher) {
    if (o.guidance_beta > 0) {
      r.counted = r.kept = r.guidance = true;
      if (!o.guidance_pg) {
        r.loss_guidance = -o.guidance_beta * x.s;  // -beta log p_S(x): imitation (10.3)
        r.dlds = -o.guidance_beta;
      } else {
        const ld A = o.guidance_beta * (x.t - x.s_old);
        const ld rho = std::exp(x.s - x.s_old);
        r.adv = A;
        r.loss_guidance = -rho * A;
        r.dlds = -rho * A;
      }
      r.error = !std::isfinite(r.loss_guidance);
    } else if (o.dense_jsd) {
      r.counted = r.kept = true;
    }
    r.loss = r.loss_guidance;
    return r;
  }
  r.counted = true;
  r.trusted = trusted;
  r.outlier = !trusted;
  const ld R = x.t - x.s_old;
  if (trusted || o.additive) {
    ld A = 0;
    bool has_pg = true;
    switch (o.tr) {
      case trust::k1: A = R; break;
      case trust::vopd: A = R + x.rkl; break;
      case trust::gopd: A = o.gopd_lambda * (x.t - x.ref) - (x.s_old - x.ref); break;
      case trust::none: has_pg = false; break;
    }
    if (has_pg) {
      // A = max(R, floor) is finite even for R = -inf (method.md 5): only an advantage that
      // stays infinite after the clamp is an error.
      const pg_term p = pg(A, x.s, x.s_old, o.clip);
      if (!std::isfinite(p.A)) {
        r.error = true;
        return r;
      }
      r.loss_trust = p.loss;
      r.dlds += p.dlds;
      r.adv += p.A;
      r.adv_clipped |= p.adv_clipped;
      r.ratio_clipped |= p.ratio_clipped;
    }
    r.kept = true;
  }
  if (!trusted) {
    switch (o.out) {
      case outlier::drop: break;
      case outlier::clip_reward: {
        const ld A = std::max(R, o.clip_tau);
        r.adv_clipped |= !(R > o.clip_tau);
        const pg_term p = pg(A, x.s, x.s_old, o.clip);
        r.loss_outlier = p.loss;
        r.dlds += p.dlds;
        r.adv += p.A;
        r.adv_clipped |= p.adv_clipped;
        r.ratio_clipped |= p.ratio_clipped;
        r.kept = true;
        break;
      }
      case outlier::fkl_c: {
        const fkl_value f = topk_fkl(x.lq, x.ls_old.empty() ? x.ls : x.ls_old, o.fkl_tail);
        if (!f.finite) {
          r.error = true;
          return r;
        }
        r.SK = f.SK;
        r.PK = f.PK;
        ld A = -f.value;
        if (A < -o.fkl_clamp) {
          A = -o.fkl_clamp;
          r.adv_clipped = true;
        }
        A *= o.fkl_weight;
        const pg_term p = pg(A, x.s, x.s_old, o.clip);
        r.loss_outlier = p.loss;
        r.dlds += p.dlds;
        r.adv += p.A;
        r.adv_clipped |= p.adv_clipped;
        r.ratio_clipped |= p.ratio_clipped;
        r.kept = true;
        break;
      }
      case outlier::fkl_p: {
        const fkl_value f = topk_fkl(x.lq, x.ls, o.fkl_tail);
        if (!f.finite) {
          r.error = true;
          return r;
        }
        r.SK = f.SK;
        r.PK = f.PK;
        r.loss_outlier = o.fkl_weight * f.value;
        r.g = f.g;
        for (ld& v : r.g) v *= o.fkl_weight;
        r.kept = true;
        break;
      }
    }
  }
  r.loss = r.loss_trust + r.loss_outlier;
  return r;
}

/// Aggregation weights (method.md 8).
inline vec weights(const objective& o, const batch& b, const std::vector<token_result>& tr, ld& normaliser) {
  const size_t n = b.tok.size();
  vec w(n, 0);
  ld denom = 0;
  switch (o.how) {
    case agg::token_mean:
      for (const auto& r : tr) denom += r.counted ? 1 : 0;
      break;
    case agg::kept_token_mean:
      for (const auto& r : tr) denom += r.kept ? 1 : 0;
      break;
    case agg::sum_over_constant: denom = o.constant; break;
    case agg::seq_mean_token_mean:
    case agg::seq_mean_token_sum:
      for (size_t j = 0; j + 1 < b.offsets.size(); ++j) {
        bool any = false;
        for (size_t i = b.offsets[j]; i < b.offsets[j + 1]; ++i) any |= tr[i].counted;
        denom += any ? 1 : 0;
      }
      break;
  }
  if (o.normaliser > 0) denom = o.normaliser;
  normaliser = denom;
  if (!(denom > 0)) return w;
  if (o.how == agg::seq_mean_token_mean || o.how == agg::seq_mean_token_sum) {
    for (size_t j = 0; j + 1 < b.offsets.size(); ++j) {
      ld c = 0;
      for (size_t i = b.offsets[j]; i < b.offsets[j + 1]; ++i) c += tr[i].counted ? 1 : 0;
      for (size_t i = b.offsets[j]; i < b.offsets[j + 1]; ++i)
        if (tr[i].counted) w[i] = (o.how == agg::seq_mean_token_mean ? 1 / c : ld(1)) / denom;
    }
  } else {
    for (size_t i = 0; i < n; ++i)
      if (tr[i].counted) w[i] = 1 / denom;
  }
  return w;
}

/// Token-level evaluation: per-token terms, weights, and the aggregated loss and parts.
inline result evaluate(const objective& o, const batch& b, const std::vector<char>& given = {}) {
  result res;
  const std::vector<char> m = decide(o, b, given);
  for (size_t i = 0; i < b.tok.size(); ++i) {
    res.tok.push_back(token_rule(o, b.tok[i], m[i] != 0));
    res.error |= res.tok.back().error;
  }
  res.w = weights(o, b, res.tok, res.normaliser);
  for (size_t i = 0; i < b.tok.size(); ++i) {
    const token_result& r = res.tok[i];
    res.loss_trust += res.w[i] * r.loss_trust;
    res.loss_outlier += res.w[i] * r.loss_outlier;
    res.loss_guidance += res.w[i] * r.loss_guidance;
  }
  res.loss = res.loss_trust + res.loss_outlier + res.loss_guidance;
  return res;
}

// ---------------------------------------------------------------------------
// Row level: tokens from logits, the dense term, and the chain rule to dL/dz.
// ---------------------------------------------------------------------------

/// The token an objective sees at a row with student logits z, teacher logits u and token
/// y (temperature 1): s = ls_y, t = lt_y, entropies, the reverse KL, and the teacher's top-K
/// list (naive::topk_ids: descending, ties by lower id, -inf never selected; padded with -inf).
inline token token_from_row(const vec& z, const vec& u, int y, who from, int K, ld s_old = nan_ld) {
  const vec ls = naive::log_softmax(z), lt = naive::log_softmax(u);
  token x;
  x.from = from;
  x.s = ls[static_cast<size_t>(y)];
  x.s_old = std::isnan(s_old) ? x.s : s_old;
  x.t = lt[static_cast<size_t>(y)];
  x.ent_s = naive::entropy(ls);
  x.ent_t = naive::entropy(lt);
  x.rkl = naive::reverse_kl(z, u).value;
  if (K > 0) {
    const std::vector<int> ids = naive::topk_ids(lt, K);
    for (int k = 0; k < K; ++k) {
      if (k < static_cast<int>(ids.size())) {
        x.ids.push_back(ids[static_cast<size_t>(k)]);
        x.lq.push_back(lt[static_cast<size_t>(ids[static_cast<size_t>(k)])]);
        x.ls.push_back(ls[static_cast<size_t>(ids[static_cast<size_t>(k)])]);
      } else {
        x.ids.push_back(0);
        x.lq.push_back(-inf);
        x.ls.push_back(0);
      }
    }
  }
  return x;
}

/// dL/dz of one row from dL/ds at the token y and dL/d ls at the top-k ids:
/// g_y (e_y - p) + sum_k g_k (e_{id_k} - p)  (method.md 1: d ls_v / dz = e_v - p).
inline vec chain_to_logits(const vec& z, int y, ld dlds, const std::vector<int>& ids, const vec& g) {
  const vec p = naive::probs(naive::log_softmax(z));
  ld total = dlds;
  for (ld x : g) total += x;
  vec out(z.size());
  for (size_t j = 0; j < z.size(); ++j) out[j] = -total * p[j];
  out[static_cast<size_t>(y)] += dlds;
  for (size_t k = 0; k < g.size(); ++k) out[static_cast<size_t>(ids[k])] += g[k];
  return out;
}

struct row_result {
  result tokens;              ///< the token-level result on the rows' tokens (dense loss included in `loss`)
  std::vector<vec> grad;      ///< [n][V] dL/dz (weighted)
};

/// Row-level evaluation: student rows z[i], teacher rows u[i], tokens y[i], origins, and
/// offsets; K teacher top-k entries per row (0: none); optional per row: s_old (empty: = s),
/// rollout-time student log-probs at the top-k ids, reference log-probs (G-OPD); given
/// decisions for region::given.
inline row_result evaluate_rows(const objective& o, const std::vector<vec>& z, const std::vector<vec>& u,
                                const std::vector<int>& y, const std::vector<who>& from,
                                const std::vector<size_t>& offsets, int K, const vec& s_old = {},
                                const std::vector<char>& given = {}, const std::vector<vec>& ls_old_topk = {},
                                const vec& ref = {}) {
  batch b;
  b.offsets = offsets;
  for (size_t i = 0; i < z.size(); ++i) {
    b.tok.push_back(token_from_row(z[i], u[i], y[i], from[i], K, s_old.empty() ? nan_ld : s_old[i]));
    if (!ls_old_topk.empty()) b.tok.back().ls_old = ls_old_topk[i];
    if (!ref.empty()) b.tok.back().ref = ref[i];
  }
  row_result rr;
  rr.tokens = evaluate(o, b, given);
  result& res = rr.tokens;
  for (size_t i = 0; i < z.size(); ++i) {
    const token_result& r = res.tok[i];
    vec gz = chain_to_logits(z[i], y[i], r.dlds, b.tok[i].ids, r.g);
    if (o.dense_jsd && from[i] != who::prompt) {
      const naive::value_grad d = naive::jsd(z[i], u[i], o.jsd_beta);
      res.loss_dense += res.w[i] * o.dense_weight * d.value;
      for (size_t j = 0; j < gz.size(); ++j) gz[j] += o.dense_weight * d.grad[j];
    }
    for (ld& v : gz) v *= res.w[i];
    rr.grad.push_back(gz);
  }
  res.loss += res.loss_dense;
  return rr;
}

}  // namespace tropd_test::naive_obj
