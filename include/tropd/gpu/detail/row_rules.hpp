// tropd/gpu/detail/row_rules.hpp: what one CUDA thread computes over its share of a row, as
// TROPD_HD code that also compiles with a plain C++20 compiler (tests/test_gpu_emulation.cpp
// runs it on the CPU, thread by thread, against the host backend).
//
//   thread_moments    pass 1: the row_moments of the thread's elements (estimators/
//                     row_moments.hpp), fp32 partials over at most flush_vectors vectors merged
//                     into an fp64 row_moments; the support rule through estimators::
//                     moment_element where a vector needs masking
//   scaled_error      the host's rule for a bad logit (NaN / +inf: non_finite_input; a finite
//                     logit that leaves the work type once divided by T: unsupported)
//   prob_split        a row's log-probabilities and probabilities in pass 1's units (pass 2, 1b)
//
// Units. fp32 work uses base-2 exponentials: pass 1 weighs element z with 2^(z c - m), c =
// W(1/T) log2(e) rounded once per row, m the thread's running maximum times c (one FFMA and
// one MUFU.EX2 per element); the sums are kept in those units and turned into natural logs
// (times ln 2) when merged in double. The distribution the sums describe is softmax(c ln2 z),
// c ln2 = (1/T)(1 + d) with |d| < 2^-23: the host's softmax(W(z) / T) to fp32 rounding. Pass 2
// uses the same c, so pass 1 and pass 2 agree with each other exactly. fp64 work uses natural
// exponentials (exp in double) and c = 1/T.
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/types.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/no_dense.hpp>
#include <tropd/estimators/row_moments.hpp>
#include <tropd/gpu/plan.hpp>

namespace tropd::gpu::detail {

/// 2^x for pass 1 and 2 of fp32 work: MUFU.EX2 on the device (ex2.approx.ftz: ~2 ulp,
/// results below 2^-126 flushed to 0), exp2f on the host (emulation).
TROPD_HD inline float fast_exp2(float x) noexcept {
#if TROPD_ON_DEVICE
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return ::exp2f(x);
#endif
}

/// Natural log for the per-element rules of fp32 work (JSD's log m): lg2.approx times ln 2 on
/// the device (__logf: absolute error 2^-21.4 on [0.5, 2], 3 ulp elsewhere), logf on the host.
TROPD_HD inline float fast_log(float x) noexcept {
#if TROPD_ON_DEVICE
  return __logf(x);
#else
  return ::logf(x);
#endif
}

/// fmax / fmin / fma in the work type (1 instruction each on the device; NaN operands are
/// dropped by fmax / fmin).
TROPD_HD inline float wmax(float a, float b) noexcept { return ::fmaxf(a, b); }
TROPD_HD inline double wmax(double a, double b) noexcept { return ::fmax(a, b); }
TROPD_HD inline float wmin(float a, float b) noexcept { return ::fminf(a, b); }
TROPD_HD inline double wmin(double a, double b) noexcept { return ::fmin(a, b); }
TROPD_HD inline float wfma(float a, float b, float c) noexcept { return ::fmaf(a, b, c); }
TROPD_HD inline double wfma(double a, double b, double c) noexcept { return ::fma(a, b, c); }

/// Arithmetic of the per-element rules in the work type: estimators::scalar_ops with the
/// backend's exp / log (what estimators::moment_element and jsd::log_m<Ops> call).
template <class W>
struct fast_ops : estimators::scalar_ops<W> {
  TROPD_HD static W exp_nonpos(W x) noexcept { return exp_(x); }
  TROPD_HD static W log(W x) noexcept { return log_(x); }
};
template <>
struct fast_ops<float> : estimators::scalar_ops<float> {
  TROPD_HD static float exp_nonpos(float x) noexcept { return fast_exp2(x); }  // pass units: base 2
  TROPD_HD static float log(float x) noexcept { return fast_log(x); }           // natural
};

/// The exponent units of the row passes in work type W (see the header comment).
template <class W>
struct pass_units {
  static constexpr bool base2 = false;
  static constexpr double unit = 1.0;          ///< natural log per exponent unit
  static constexpr W lo = estimators::exp_floor<W>;       ///< below this (in units) a weight is exactly 0
  TROPD_HD static W e(W x) noexcept { return exp_(x); }
  TROPD_HD static W scale(double inv_t) noexcept { return W(inv_t); }
};
template <>
struct pass_units<float> {
  static constexpr bool base2 = true;
  static constexpr double unit = 0.6931471805599453;  // ln 2
  static constexpr float lo = -125.0f;                // 2^-125 > FLT_MIN: no denormal flush in range
  TROPD_HD static float e(float x) noexcept { return fast_exp2(x); }
  /// c = W(1/T) log2(e), rounded once.
  TROPD_HD static float scale(double inv_t) noexcept { return float(inv_t) * 1.4426950408889634f; }
};

/// One logit scaled as the host scales it, x = W(z) * W(1/T), and its verdict
/// (rules::scaled_logit_error, the rule both backends apply).
template <class W, class T>
TROPD_HD inline errc scaled_error(T raw, W inv_t) noexcept {
  return rules::scaled_logit_error(raw, static_cast<W>(to_acc(raw)) * inv_t);
}

/// Bytes of a vector store of N values of G (16 at most).
template <class G, int N>
inline constexpr int store_align = (N * int(sizeof(G))) >= 16 ? 16 : N * int(sizeof(G));

/// A row's geometry for vectors of VW elements: `head` scalar columns up to the student row's
/// first 16-byte boundary, `nvec` vectors, a scalar tail. `vector` is false when the teacher or
/// output row is not aligned like the student row at the head (other strides or types): the
/// row is then walked as V vectors of one element (every block still takes its share).
struct row_geometry {
  index_t head = 0, nvec = 0, V = 0;
  bool vector = false;
};

template <int VW, class TS, class TT, class G>
TROPD_HD inline row_geometry make_geometry(const TS* zs, const TT* zt, const G* out, index_t V) {
  row_geometry g;
  g.V = V;
  const uintptr_t as = reinterpret_cast<uintptr_t>(zs);
  bool ok = VW > 1 && (as % sizeof(TS)) == 0;
  index_t head = 0;
  if (ok) {
    const index_t mis = index_t((as / sizeof(TS)) % VW);
    head = mis ? VW - mis : 0;
    if (head > V) head = V;
    if (zt) ok = ok && (reinterpret_cast<uintptr_t>(zt + head) % (uintptr_t(VW) * sizeof(TT))) == 0;
    if (out) ok = ok && (reinterpret_cast<uintptr_t>(out + head) % uintptr_t(store_align<G, VW>)) == 0;
  }
  if (ok) {
    g.vector = true;
    g.head = head;
    g.nvec = (V - head) / VW;
  } else {
    g.vector = false;
    g.head = 0;
    g.nvec = V;
  }
  return g;
}

/// The columns [c0, c1) of block b of S under geometry g (what sweep visits).
template <int VW>
TROPD_HD inline col_range columns_of(const row_geometry& g, int b, int S) {
  return g.vector ? block_columns(g.V, g.head, g.nvec, VW, b, S) : block_columns(g.V, 0, g.V, 1, b, S);
}

/// Vectors a thread sums in W before merging the sums into its fp64 row_moments (so no W sum
/// runs over more than flush_vectors x 8 elements, the host's fp32-chunk / fp64-merge split).
inline constexpr int flush_vectors = 16;

/// Mergeable pass-1 result of a thread, a block, or a row: the moments in double (natural
/// units, estimators/row_moments.hpp) and whether some element needs the error rescan.
struct pass1_partial {
  estimators::row_moments<double> m{};
  int flagged = 0;
  /// The first bad logit the rescan found: pass1_error_key(col, teacher) * 16 + errc, or none.
  int64_t bad = bad_none;
  static constexpr int64_t bad_none = 0x7fffffffffffffffll;

  TROPD_HD void merge(const pass1_partial& o) noexcept {
    m.merge(o.m);
    flagged |= o.flagged;
    if (o.bad < bad) bad = o.bad;
  }
  /// Whether the row (part) must be rescanned for a bad logit: an element failed the host's
  /// rule on a masked vector, a weight became NaN (a NaN input on a vector that needed no
  /// masking), or a running maximum is not finite (+inf, or a base-2 overflow).
  TROPD_HD bool needs_rescan(bool has_t) const noexcept {
    return flagged || is_nan(m.mass_s) || (has_t && is_nan(m.mass_t));
  }
};
struct merge_pass1 {
  TROPD_HD pass1_partial operator()(pass1_partial a, const pass1_partial& b) const noexcept {
    a.merge(b);
    return a;
  }
};

#if defined(__CUDACC__)
#define TROPD_GPU_COLD __noinline__
#else
#define TROPD_GPU_COLD
#endif

template <class W>
struct masked_result {
  W t[6];
  int flagged;
};

/// One element of pass 1 on a vector that needs masking: estimators::moment_element (the
/// support rule) on the element's centred exponents (pass units, centres nms, nmt), and the
/// host's bad-value rule (flagged). Supports follow the inputs: a finite z whose centred
/// exponent overflowed W is supported (weight 0), a -inf z is not.
template <class W, bool HasT>
TROPD_HD TROPD_GPU_COLD masked_result<W> masked_terms(W z, W u, W cs, W nms, W ct, W nmt, W its, W itt) noexcept {
  constexpr W lowest = sizeof(W) == 4 ? W(-3.4028234663852886e38) : W(-1.7976931348623157e308);
  masked_result<W> r;
  r.flagged = scaled_error<W>(z, its) != errc::ok ? 1 : 0;
  const W a = z == -inf<W>() ? -inf<W>() : max_(wfma(z, cs, nms), lowest);
  W b = -inf<W>();
  if constexpr (HasT) {
    r.flagged |= scaled_error<W>(u, itt) != errc::ok ? 1 : 0;
    b = u == -inf<W>() ? -inf<W>() : max_(wfma(u, ct, nmt), lowest);
  }
  estimators::moment_element<fast_ops<W>>(a, b, W(0), W(0), HasT, pass_units<W>::lo, r.t);
  return r;
}

/// Pass 1 of one thread: add<N>() one vector of N elements at a time (z: student, u: teacher,
/// converted to W, unscaled), finish() at the end. M: the sums the caller reads (the masses
/// always); a vector whose elements all have a weight above 2^lo takes the fast path (M's
/// sums only, FMAs), any other the masked path (every sum, through moment_element, and the
/// host's rule for bad values).
template <class W, bool HasT, estimators::moments_needed M = estimators::all_moments>
struct thread_moments {
  using U = pass_units<W>;
  W cs = W(1), ct = W(1);    ///< c of the student and teacher rows
  W its = W(1), itt = W(1);  ///< W(1/T): the host's scale, for the bad-value rule
  W mz = -inf<W>(), mu = -inf<W>();    ///< running maxima of the unscaled values
  W nms = -inf<W>(), nmt = -inf<W>();  ///< -(mz c_s), -(mu c_t): the centres in units
  W s0 = W(0), s1 = W(0), s2 = W(0), s3 = W(0), s4 = W(0), s5 = W(0);  ///< W sums since the last flush
  int pending = 0;
  int flagged = 0;
  /// The thread's fp64 moments, touched only by flush(): kept out of registers by the kernels
  /// (a shared-memory slot per thread), a local object in the CPU emulation.
  estimators::row_moments<double>* acc = nullptr;

  TROPD_HD thread_moments(double inv_ts, double inv_tt, estimators::row_moments<double>* acc_) noexcept
      : cs(U::scale(inv_ts)), ct(U::scale(inv_tt)), its(W(inv_ts)), itt(W(inv_tt)), acc(acc_) {
    *acc = estimators::row_moments<double>{};
  }

  /// Moves the W sums (relative to the current centres) into acc, in natural units.
  TROPD_HD void flush() noexcept {
    estimators::row_moments<double> p;
    p.max_s = mz > -inf<W>() ? -double(nms) * U::unit : -inf<double>();
    p.mass_s = double(s0);
    p.moment_s = double(s1) * U::unit;
    p.cross_s = double(s2) * U::unit;
    if constexpr (HasT) {
      p.max_t = mu > -inf<W>() ? -double(nmt) * U::unit : -inf<double>();
      p.mass_t = double(s3);
      p.moment_t = double(s4) * U::unit;
      p.cross_t = double(s5) * U::unit;
    }
    acc->merge(p);
    s0 = s1 = s2 = s3 = s4 = s5 = W(0);
    pending = 0;
  }
  /// A running maximum grew: flush the sums relative to the old centres, move the centres.
  TROPD_HD void new_max(W vz, W vu) noexcept {
    flush();
    if (vz > mz) {
      mz = vz;
      nms = -(mz * cs);
      if (!is_finite(nms)) flagged = 1;  // +inf input, or |z c| beyond W (checked by the rescan)
    }
    if constexpr (HasT) {
      if (vu > mu) {
        mu = vu;
        nmt = -(mu * ct);
        if (!is_finite(nmt)) flagged = 1;
      }
    }
  }
  /// The masked path of one vector: masked_terms per element (kept out of line on the
  /// device: a cold path that must not cost the fast loop registers).
  template <int N>
  TROPD_HD void add_masked(const W (&z)[N], const W (&u)[N]) noexcept {
    for (int i = 0; i < N; ++i) {
      const masked_result<W> e = masked_terms<W, HasT>(z[i], HasT ? u[i] : W(0), cs, nms, ct, nmt, its, itt);
      flagged |= e.flagged;
      s0 += e.t[estimators::moment_w];
      s1 += e.t[estimators::moment_w_da];
      s2 += e.t[estimators::moment_cross_s];
      if constexpr (HasT) {
        s3 += e.t[estimators::moment_v];
        s4 += e.t[estimators::moment_v_db];
        s5 += e.t[estimators::moment_cross_t];
      }
    }
  }
  /// One vector of N elements (u is ignored without a teacher).
  template <int N>
  TROPD_HD void add(const W (&z)[N], const W (&u)[N]) noexcept {
    W vz = z[0], nz = z[0], vu = W(0), nu = W(0);
    for (int i = 1; i < N; ++i) {
      vz = wmax(vz, z[i]);
      nz = wmin(nz, z[i]);
    }
    if constexpr (HasT) {
      vu = nu = u[0];
      for (int i = 1; i < N; ++i) {
        vu = wmax(vu, u[i]);
        nu = wmin(nu, u[i]);
      }
    }
    if (vz > mz || (HasT && vu > mu)) new_max(vz, vu);
    // The smallest exponent of each row (c > 0: the exponent grows with z).
    bool fast = wfma(nz, cs, nms) >= U::lo;
    if constexpr (HasT) fast = fast && wfma(nu, ct, nmt) >= U::lo;
    if (fast) {
      // Fast path: every weight is above 2^lo (no -inf, no underflow): the support rule
      // reduces to these FMAs (the same values), and only M's sums are formed.
      for (int i = 0; i < N; ++i) {
        const W da = wfma(z[i], cs, nms);
        const W w = U::e(da);
        s0 += w;
        if constexpr (M.ent_s) s1 = wfma(w, da, s1);
        if constexpr (HasT) {
          const W db = wfma(u[i], ct, nmt);
          const W v = U::e(db);
          s3 += v;
          const W dd = da - db;
          if constexpr (M.ent_t) s4 = wfma(v, db, s4);
          if constexpr (M.rkl) s2 = wfma(w, dd, s2);
          if constexpr (M.fkl) s5 = wfma(v, -dd, s5);
        }
      }
    } else {
      add_masked<N>(z, u);
    }
    if (++pending == flush_vectors) flush();
  }
  TROPD_HD pass1_partial finish() noexcept {
    flush();
    pass1_partial p;
    p.m = *acc;
    p.flagged = flagged;
    return p;
  }
};

/// Row statistics from merged pass-1 moments, as host row_pass1 finishes them: the summary,
/// with the fields M does not read NaN (and every teacher field NaN without a teacher).
/// Requires mass_s > 0 (and mass_t > 0 with a teacher).
template <estimators::moments_needed M>
TROPD_HD inline estimators::row_summary finish_summary(estimators::row_moments<double> mom, bool has_t) noexcept {
  if (!has_t) {
    mom.max_t = 0;
    mom.mass_t = 1;
  }
  estimators::row_summary out = estimators::summarize(mom);
  if (!has_t) out.lse_t = out.rkl = out.fkl = out.ent_t = quiet_nan<double>();
  if constexpr (!M.ent_s) out.ent_s = quiet_nan<double>();
  if constexpr (!M.ent_t) out.ent_t = quiet_nan<double>();
  if constexpr (!M.rkl) out.rkl = quiet_nan<double>();
  if constexpr (!M.fkl) out.fkl = quiet_nan<double>();
  return out;
}

/// A row's log-sum-exp in pass 1's units, split so that log-probabilities keep their
/// precision however large a common offset of the logits is (the host's lse_split):
/// x = z c - L, L = lse / unit = C + d (C = W(L), d = W(L - C)); log p = x unit, p = e(x).
template <class W>
struct prob_split {
  using U = pass_units<W>;
  W c = W(1), negC = W(0), d = W(0);
  prob_split() = default;
  TROPD_HD prob_split(double lse, W c_) noexcept : c(c_) {
    const double L = lse / U::unit;
    const W C = W(L);
    negC = -C;
    d = W(L - double(C));
  }
  /// The exponent x of element z (pass units).
  TROPD_HD W exponent(W z) const noexcept { return wfma(z, c, negC) - d; }
  TROPD_HD W log_prob(W x) const noexcept { return x * W(U::unit); }
  TROPD_HD W prob(W x) const noexcept { return U::e(x); }
};

using estimators::no_dense;  // estimators/no_dense.hpp
using estimators::reads_q;
using estimators::reads_teacher;

/// Divergences whose per-element rules read log m (JSD): log_m<Ops>, terms_lm, grad_lm.
template <class Est>
concept mixture_divergence = requires(const Est& e, float x, float& t, const estimators::row_summary& r) {
  { e.template log_m<estimators::scalar_ops<float>, float>(x, x) } -> std::convertible_to<float>;
  e.terms_lm(x, x, x, x, x, t, t);
  { e.grad_lm(x, x, x, x, x, r) } -> std::convertible_to<float>;
};
/// Estimators exposing their second-pass terms per element (summed in W per flush window).
template <class Est>
concept has_terms = requires(const Est& e, float x, float& t) { e.terms(x, x, x, x, t, t); } || mixture_divergence<Est>;

/// The dense gradient of one element, dL/da = est.grad(ls, lt, p, q) (mixture divergences:
/// grad_lm with log m = est.log_m<fast_ops>(p, q)).
template <class W, class Est>
TROPD_HD inline W dense_grad(const Est& est, W ls, W lt, W p, W q, const estimators::row_summary& s) noexcept {
  if constexpr (std::is_same_v<Est, no_dense>) {
    return W(0);
  } else if constexpr (mixture_divergence<Est>) {
    const W lm = est.mixture() ? est.template log_m<fast_ops<W>, W>(p, q) : W(0);
    return est.grad_lm(ls, lt, lm, p, q, s);
  } else {
    return est.template grad<W>(ls, lt, p, q, s);
  }
}

/// The second-pass terms of one element (t0, t1) for estimators with per-element terms.
template <class W, class Est>
TROPD_HD inline void second_terms(const Est& est, W ls, W lt, W p, W q, W& t0, W& t1) noexcept {
  if constexpr (mixture_divergence<Est>) {
    est.terms_lm(ls, lt, est.template log_m<fast_ops<W>, W>(p, q), p, q, t0, t1);
  } else {
    est.terms(ls, lt, p, q, t0, t1);
  }
}

/// The value a gradient pass writes at a listed (top-k) id j, given the dense part alone
/// d = G(wd est.grad_j) and p_j (core/sparse_terms.hpp: p_j's own coefficient wl = P_j scale),
/// before the entries' coefficients are added: the host's row_pass2 rule.
template <class G>
TROPD_HD inline G listed_base(G dense_only, double p, double wl) noexcept {
  return static_cast<G>(double(dense_only) - p * wl);
}

/// The coefficients of one row's gradient pass (core/sparse_terms.hpp): dL/dz_j =
/// scale (dense_weight est.grad_j + sum_{e at j} g_e - p_j P_j), written as
/// G(wd grad_j - wg p_j), listed ids (split) as G(G(wd grad_j) - p_j wl), then + G(g_e scale).
struct grad_coefs {
  double scale = 0;      ///< w_r / T_S (or grad_scale_r / T_S); 0: an exact zero row
  double wd = 0;         ///< dense_weight * scale
  double wg = 0;         ///< P_j (unlisted) * scale
  double wl = 0;         ///< P_j (listed) * scale
  int split = 0;         ///< listed ids take their own P_j
  int y_entry = -1;      ///< the entry that is not a list entry (the row's token), or -1
  int y_listed_at = -1;  ///< the list entry with the token's id, or -1
};
TROPD_HD inline grad_coefs make_grad_coefs(const sparse_terms& sp, double scale, double dense_weight) noexcept {
  grad_coefs c;
  c.scale = scale;
  const double gsum = sp.sum();
  c.wd = dense_weight * scale;
  c.wg = sp.p_coef_other(gsum) * scale;
  c.wl = sp.p_coef_listed(gsum) * scale;
  c.split = sp.split() ? 1 : 0;
  if (sp.n > sp.n_listed) {
    c.y_entry = sp.n_listed;
    for (int e = 0; e < sp.n_listed; ++e)
      if (sp.ids[e] == sp.ids[c.y_entry]) c.y_listed_at = e;
  }
  return c;
}

/// What a row's merged pass-1 result means (host row_pass1's order): the first bad logit
/// (non_finite_input / unsupported), a flagged row without one (the device's base-2 range),
/// then a student / teacher row without a finite entry. ok: `summary` is set.
struct pass1_verdict {
  errc code = errc::ok;
  check_site site = check_site::none;
  index_t col = -1;
};
template <estimators::moments_needed M>
TROPD_HD inline pass1_verdict row_pass1_status(const pass1_partial& p, bool has_t, estimators::row_summary& summary) {
  pass1_verdict v;
  if (p.bad != pass1_partial::bad_none) {
    v.code = static_cast<errc>(p.bad % 16);
    const int64_t key = p.bad / 16;
    const bool teacher = pass1_error_teacher(key) != 0;
    v.col = pass1_error_col(key);
    v.site = v.code == errc::unsupported ? (teacher ? check_site::teacher_scaled : check_site::student_scaled)
                                          : (teacher ? check_site::teacher_logits : check_site::student_logits);
  } else if (p.needs_rescan(has_t)) {
    v.code = errc::unsupported;
    v.site = check_site::base2_range;
  } else if (!(p.m.mass_s > 0)) {
    v.code = errc::no_finite_entry;
    v.site = check_site::student_row_empty;
  } else if (has_t && !(p.m.mass_t > 0)) {
    v.code = errc::no_finite_entry;
    v.site = check_site::teacher_row_empty;
  } else {
    summary = finish_summary<M>(p.m, has_t);
  }
  return v;
}

/// One element of pass 2 without the sparse entries: G(wd est.grad - wg p) (wd, wg in W).
template <class W, class Est, class G>
TROPD_HD inline G grad_value(const Est& est, const prob_split<W>& ps, const prob_split<W>& pt, W z, W u, W wd, W wg,
                                        const estimators::row_summary& s) {
  const W xs = ps.exponent(z);
  const W p = ps.prob(xs);
  if constexpr (!reads_teacher<Est>) {
    return static_cast<G>(-wg * p);
  } else {
    const W xt = pt.exponent(u);
    const W q = reads_q<Est> ? pt.prob(xt) : W(0);
    return static_cast<G>(wd * dense_grad<W>(est, ps.log_prob(xs), pt.log_prob(xt), p, q, s) - wg * p);
  }
}

/// The value pass 2 writes at the id of sparse entry e, given the dense values already
/// written (out), or false where entry e adds nothing on its own (the row's token at a listed
/// id: added with its list entry). The host's row_pass2 order: a listed id (split) takes
/// G(G(wd grad_j) - p_j wl), otherwise its dense value; then its coefficient; then the token's
/// coefficient where the token has the same id. Listed ids are unique, so the entries of a row
/// touch distinct columns and can be applied in any order.
template <class W, class Est, class G, class TS, class TT>
TROPD_HD inline bool sparse_entry_value(const Est& est, const prob_split<W>& ps, const prob_split<W>& pt, const TS* zs, const TT* zt,
                                        const G* out, const sparse_terms& sp, const grad_coefs& c, int e, W wd,
                                        const estimators::row_summary& s, G& v) noexcept {
  if (e >= sp.n_listed && c.y_listed_at >= 0) return false;
  const int32_t j = sp.ids[e];
  if (e < sp.n_listed && c.split) {
    const W z = static_cast<W>(to_acc(zs[j]));
    const W u = zt ? static_cast<W>(to_acc(zt[j])) : W(0);
    const G dense_only = grad_value<W, Est, G>(est, ps, pt, z, u, wd, W(0), s);
    v = listed_base<G>(dense_only, double(ps.prob(ps.exponent(z))), c.wl);
  } else {
    v = out[j];
  }
  v += static_cast<G>(sp.coef[e] * c.scale);
  if (e == c.y_listed_at) v += static_cast<G>(sp.coef[c.y_entry] * c.scale);
  return true;
}

}  // namespace tropd::gpu::detail
