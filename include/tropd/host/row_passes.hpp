// tropd/host/row_passes.hpp: the CPU backend's passes over one row pair.
//
//   pass 1  row_pass1: one read of both rows: the mergeable row_moments (estimators/
//           row_moments.hpp: both log-sum-exps, entropies, the centred sums behind both
//           KLs), NaN / +inf detection with the position, and (where asked) the teacher's
//           top-k entries, selected in the same read (host/topk_select.hpp);
//   pass 1b row_pass1b (JSD, TV only): the estimator's second-pass sums;
//   pass 2  row_pass2: one write of dL/dz_j = scale (w est.grad_j + sum_{e at j} g_e - p_j P_j),
//           a full-vocabulary estimator's gradient (weight w) plus the row's sparse terms
//           (core/sparse_terms.hpp: the sampled token, the teacher's top-k ids). It reads the
//           student row, and the teacher row only for a dense estimator.
// Rows are processed in chunks of `chunk` elements: each chunk is read in place (fp32 at
// temperature 1) or widened (bf16 / fp16 -> fp32 in registers, temperature applied) into
// an L1 buffer, and handled by single loops over Eigen packets (vectorised exp); the next
// chunks are prefetched during the exp loop. Sums are centred at the row's running maxima;
// no [rows x vocab] probability array is ever built.
//
// exp per element: pass 1 takes one per row read (student, teacher); pass 2 one per
// probability it needs (p; q for estimators that read it), none when pass 1's exponentials
// were kept (buf.keep: row_order::single_read, and pass 1b of second-pass estimators).
// Probabilities are formed as p_j = e^{a_j - M_c} e^{M_c - lse} (M_c: the row's running
// maximum at j's chunk) whether kept or recomputed, so both give bit-identical results.
// A mixture divergence (JSD) takes one log per element in pass 1b, kept for pass 2 under
// row_order::single_read. Costs per element: docs/performance.md.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <concepts>
#include <cstring>
#include <type_traits>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/checks.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/sparse_terms.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token_rules.hpp>
#include <tropd/core/types.hpp>
#include <tropd/core/views.hpp>
#include <tropd/estimators/full_vocab.hpp>
#include <tropd/estimators/no_dense.hpp>
#include <tropd/estimators/row_moments.hpp>
#include <tropd/estimators/topk.hpp>
#include <tropd/host/options.hpp>
#include <tropd/host/row_scratch.hpp>
#include <tropd/host/simd.hpp>

namespace tropd::host::detail {

/// Chunk sums of pass 1 (estimators/row_moments.hpp; relative to the running maxima Ms, Mt
/// of the row): out = {mass_s, moment_s, cross_s, mass_t, moment_t, cross_t} of the chunk.
/// The masked path evaluates estimators::moment_element (the support rule) on packets.
/// `fast`: no -inf and no underflow in the chunk (and both maxima finite), so the rule needs
/// no masking and reduces to fused multiply-adds (the same values).
/// `sel`: also marks, per packet, whether a teacher value exceeds `thr` (the top-k heap's
/// root at the start of the chunk) in the bit mask `hits` (bit j: packet j), so the top-k
/// selection only visits those packets afterwards (no separate pass, no branches here).
/// `M`: the sums the caller reads (the masses always). The fast path skips the others, whose
/// out[] entries are then meaningless (row_pass1 turns the fields they feed into NaN); the
/// masked path always computes all six. A kept sum is bit-identical whatever M is.
template <class W, bool teacher, bool fast, bool keep, bool sel = false,
          estimators::moments_needed M = estimators::all_moments>
TROPD_HOST_INLINE void chunk_sums(const W* A, const W* B, index_t np, W Ms, W Mt, W* keep_w, W* keep_v, const prefetch_plan& pf,
                       double* out, W thr = W(0), uint64_t* hits = nullptr) noexcept {
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  const P ms = pk::pset1<P>(Ms), mt = pk::pset1<P>(Mt), zero = pk::pzero(ms), ninf = pk::pset1<P>(-inf<W>());
  P mass_s = zero, moment_s = zero, cross_s = zero, mass_t = zero, moment_t = zero, cross_t = zero;
  for (index_t i = 0; i < np; i += L) {
    pf.at(i / L);
    const P a = pk::ploadu<P>(A + i);
    [[maybe_unused]] const P b = teacher ? pk::ploadu<P>(B + i) : ninf;
    if constexpr (teacher && sel) {
      const index_t j = i / L;
      hits[j >> 6] |= uint64_t(pk::predux_any(pk::pcmp_lt(pk::pset1<P>(thr), b))) << (j & 63);
    }
    if constexpr (fast) {
      const P da = pk::psub(a, ms);
      const P w = exp_nonpos<false>(da);  // da >= exp_floor
      mass_s = pk::padd(mass_s, w);
      if constexpr (keep) pk::pstoreu(keep_w + i, w);
      if constexpr (M.ent_s) moment_s = pk::pmadd(w, da, moment_s);
      if constexpr (teacher) {
        const P db = pk::psub(b, mt);
        const P v = exp_nonpos<false>(db);
        mass_t = pk::padd(mass_t, v);
        if constexpr (keep) pk::pstoreu(keep_v + i, v);
        const P dd = pk::psub(da, db);
        if constexpr (M.ent_t) moment_t = pk::pmadd(v, db, moment_t);
        if constexpr (M.rkl) cross_s = pk::pmadd(w, dd, cross_s);
        if constexpr (M.fkl) cross_t = pk::pmadd(v, dd, cross_t);  // -cross_t: negated once at the end (exact)
      }
    } else {
      P e[6];
      estimators::moment_element<packet_ops<W>>(a, b, ms, mt, teacher, exp_floor<W>, e);
      mass_s = pk::padd(mass_s, e[estimators::moment_w]);
      moment_s = pk::padd(moment_s, e[estimators::moment_w_da]);
      cross_s = pk::padd(cross_s, e[estimators::moment_cross_s]);
      if constexpr (keep) pk::pstoreu(keep_w + i, e[estimators::moment_w]);
      if constexpr (teacher) {
        mass_t = pk::padd(mass_t, e[estimators::moment_v]);
        moment_t = pk::padd(moment_t, e[estimators::moment_v_db]);
        cross_t = pk::padd(cross_t, e[estimators::moment_cross_t]);
        if constexpr (keep) pk::pstoreu(keep_v + i, e[estimators::moment_v]);
      }
    }
  }
  out[0] = double(pk::predux(mass_s));
  out[1] = double(pk::predux(moment_s));
  out[2] = double(pk::predux(cross_s));
  out[3] = double(pk::predux(mass_t));
  out[4] = double(pk::predux(moment_t));
  out[5] = double(pk::predux(cross_t));
  if constexpr (fast) out[5] = -out[5];
}

/// The first error of a chunk after scaling by 1/T in the work type, or ok: non_finite_input
/// at a NaN / +inf input; unsupported at a finite logit whose scaled value left the work
/// type's range (+inf, or -inf, which would otherwise read as "zero mass"), e.g. 3e38 at
/// T = 0.05 in fp32. Called only for chunks whose scan saw a NaN / +inf, or a -inf with
/// 1/T > 1 (the only case where a finite value can scale to -inf).
template <class W, class T>
inline status scaled_error(const T* raw, const W* scaled, index_t n, index_t c0, index_t row, bool student) noexcept {
  for (index_t j = 0; j < n; ++j) {
    const errc e = rules::scaled_logit_error(raw[j], scaled[j]);
    if (e == errc::ok) continue;
    if (e == errc::unsupported)
      return make_error(errc::unsupported,
                        student ? "a finite student logit divided by the temperature leaves the work type's range (pass fp64 logits or use a larger temperature)"
                                : "a finite teacher logit divided by the temperature leaves the work type's range (pass fp64 logits or use a larger temperature)",
                        row, c0 + j);
    return make_error(errc::non_finite_input, student ? "student logits contain NaN or +inf" : "teacher logits contain NaN or +inf", row,
                      c0 + j);
  }
  return {};
}

/// Pass 1 over one row pair; teacher may be nullptr (student-only statistics).
/// Reads each row once: per chunk, widen/scale into L1, one scan (maxima, NaN/+inf), one
/// exp pass (both rows' sums). Sums are kept relative to the running maxima of the row and
/// re-centred only when a maximum grows. With buf.keep the exponentials are kept for the
/// row's later passes;
/// with `topk` (> 0) the teacher's top-k entries are selected in the same pass.
/// `M`: the summary fields the caller reads (lse_s, lse_t always); the others are NaN in
/// `out`. The default computes everything.
/// row_pass1_moments is its first half: the row's (or a vocabulary shard's) unfinalised
/// row_moments, with no check of the masses (a shard may hold no finite entry of a row);
/// it leaves buf.kept false (row_pass1 sets it once the row is valid).
template <estimators::moments_needed M = estimators::all_moments, class W, class TS, class TT>
inline status row_pass1_moments(const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt, row_scratch<W>& buf, index_t row,
                                estimators::row_moments<double>& mom, int topk = 0) noexcept {
  mom = estimators::row_moments<double>{};
  const bool has_t = zt != nullptr;
  W Ms = -inf<W>(), Mt = -inf<W>();
  buf.kept = false;
  if (topk > 0) buf.topk.reset(topk, buf.topk_ids.data(), buf.topk_vals.data());
  for (index_t c0 = 0, c = 0; c0 < V; c0 += chunk, ++c) {
    const index_t n = std::min(chunk, V - c0), np = padded<W>(n);
    const W *A = buf.a, *B = buf.b;
    const range_info<W> ra = stage_chunk<W, TS>(zs + c0, n, inv_ts, buf.a, A);
    if (ra.bad || (ra.has_ninf && inv_ts > W(1))) TROPD_TRY(scaled_error(zs + c0, A, n, c0, row, true));
    range_info<W> rb{-inf<W>(), false, false};
    if (has_t) {
      rb = stage_chunk<W, TT>(zt + c0, n, inv_tt, buf.b, B);
      if (rb.bad || (rb.has_ninf && inv_tt > W(1))) TROPD_TRY(scaled_error(zt + c0, B, n, c0, row, false));
    }
    // Re-centre the row's sums when a running maximum grows.
    const W Ms2 = max_(Ms, ra.max), Mt2 = max_(Mt, rb.max);
    if (Ms2 != Ms || Mt2 != Mt) {
      mom.rebase(double(Ms2), has_t ? double(Mt2) : -inf<double>());
      Ms = Ms2;
      Mt = Mt2;
    }
    // The exponentials go to the kept arrays (buf.keep) or, unused, to the chunk buffers.
    W* kw = buf.keep ? buf.keep_w.p + c0 : buf.wa;
    W* kv = buf.keep && buf.keep_teacher && has_t ? buf.keep_v.p + c0 : buf.wb;
    if (buf.keep) {  // (only for fp32 work: see chunk_probs)
      buf.keep_ms[static_cast<size_t>(c)] = Ms;
      if (buf.keep_teacher && has_t) buf.keep_mt[static_cast<size_t>(c)] = Mt;
    }
    double s[6];
    // Fast path: no -inf and no e^{x - M} below exp_floor in the chunk (no masking needed).
    const bool fast = !ra.has_ninf && !rb.has_ninf && ra.min - Ms >= exp_floor<W> && (!has_t || rb.min - Mt >= exp_floor<W>);
    prefetch_plan pf;
    pf.ahead(zs, c0, V, prefetch_ahead_stats);
    if (has_t) pf.ahead(zt, c0, V, prefetch_ahead_stats);
    // The top-k selection runs inside the exp loop: packets holding a value above the heap's
    // root are marked there and pushed (in id order) below.
    // (Until the heap is full, the chunk goes through push_range, which fills it in id order.)
    const bool filling = topk > 0 && has_t && buf.topk.filled < buf.topk.k;
    if (filling) buf.topk.push_range(B, c0, n, rb.max);
    const bool sel = topk > 0 && has_t && !filling && rb.max > buf.topk.root_value();
    uint64_t hits[(chunk / lanes<W> + 63) / 64] = {};
    const W thr = sel ? buf.topk.root_value() : W(0);
    // One chunk_sums instantiation per (teacher, fast, keep, sel); M matters only on the fast
    // path (the masked path computes every sum).
    with_flags(has_t, fast, buf.keep, sel, [&](auto T, auto F, auto K, auto S) {
      if constexpr (!S || T) chunk_sums<W, T, F, K, S, F ? M : estimators::all_moments>(A, B, np, Ms, Mt, kw, kv, pf, s, thr, hits);
    });
    if (sel) {  // packets in increasing order, lanes in increasing order: ids grow
      constexpr index_t L = lanes<W>;
      for (index_t w = 0; w < (np / L + 63) / 64; ++w)
        for (uint64_t bits = hits[w]; bits != 0; bits &= bits - 1) {
          const index_t j0 = (w * 64 + lowest_bit(bits)) * L;
          for (index_t j = j0; j < std::min(j0 + L, n); ++j) buf.topk.push(B[j], c0 + j);
        }
    }
    mom.mass_s += s[0];
    mom.moment_s += s[1];
    mom.cross_s += s[2];
    mom.mass_t += s[3];
    mom.moment_t += s[4];
    mom.cross_t += s[5];
  }
  if (topk > 0 && has_t) buf.topk.finish();
  return {};
}

template <estimators::moments_needed M = estimators::all_moments, class W, class TS, class TT>
inline status row_pass1(const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt, row_scratch<W>& buf, index_t row,
                        estimators::row_summary& out, int topk = 0) noexcept {
  estimators::row_moments<double> mom;
  const bool has_t = zt != nullptr;
  TROPD_TRY((row_pass1_moments<M>(zs, zt, V, inv_ts, inv_tt, buf, row, mom, topk)));
  if (!(mom.mass_s > 0)) return make_error(errc::no_finite_entry, "student logits row is -inf everywhere", row);
  if (has_t && !(mom.mass_t > 0)) return make_error(errc::no_finite_entry, "teacher logits row is -inf everywhere", row);
  if (!has_t) { mom.max_t = 0; mom.mass_t = 1; }  // a finite stand-in for summarize; its fields become NaN below
  out = estimators::summarize(mom);
  if (!has_t) out.lse_t = out.rkl = out.fkl = out.ent_t = quiet_nan<double>();  // no teacher row: undefined
  // Sums the fast path skipped (M): their fields are NaN, never a plausible wrong value.
  if constexpr (!M.ent_s) out.ent_s = quiet_nan<double>();
  if constexpr (!M.ent_t) out.ent_t = quiet_nan<double>();
  if constexpr (!M.rkl) out.rkl = quiet_nan<double>();
  if constexpr (!M.fkl) out.fkl = quiet_nan<double>();
  buf.kept = buf.keep;
  return {};
}

/// log(1 - P_K) of a student row, for the tail-bucket policy: the log-mass of the entries
/// outside the list ids[0, n) (entries whose teacher log-prob is -inf are padding, not in the
/// list). Without cancellation: where estimators::tail_estimate_usable says the estimate
/// from the listed log-probs is accurate, it is used; otherwise the entries outside the list
/// are summed directly in one more read of the student row (log-sum-exp over the row minus
/// the listed ids). -inf exactly when the student has no finite logit outside the list, in
/// every work type.
template <class W, class TS, class Q>
inline double student_tail_log(const TS* zs, index_t V, W its, double lse_s, const int32_t* ids, const Q& teacher, int n,
                               row_scratch<W>& buf) {
  double lse_k = -inf<double>();
  buf.tail_ids.clear();
  for (int i = 0; i < n; ++i) {
    if (double(teacher[i]) == -inf<double>()) continue;
    buf.tail_ids.push_back(ids[i]);
    lse_k = logaddexp(lse_k, rules::log_prob_at(zs, ids[i], its, lse_s));
  }
  const double est = log1mexp(min_(lse_k, 0.0));
  if (estimators::tail_estimate_usable(est, static_cast<int>(buf.tail_ids.size()), lse_s)) return est;
  std::sort(buf.tail_ids.begin(), buf.tail_ids.end());
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  const P lo = pk::pset1<P>(exp_floor<W>), zero = pk::pset1<P>(W(0));
  double M = -inf<double>(), S = 0;
  size_t j = 0;
  for (index_t c0 = 0; c0 < V; c0 += chunk) {
    const index_t n_c = std::min(chunk, V - c0), np = padded<W>(n_c);
    load_scaled(zs + c0, n_c, its, buf.a);  // a copy (padded with -inf): the listed ids are removed in it
    for (; j < buf.tail_ids.size() && buf.tail_ids[j] < c0 + n_c; ++j) buf.a[buf.tail_ids[j] - c0] = -inf<W>();
    P mx = pk::pset1<P>(-inf<W>());
    for (index_t i = 0; i < np; i += L) mx = pk::pmax(mx, pk::pload<P>(buf.a + i));
    const W m = pk::predux_max(mx);
    if (!(m > -inf<W>())) continue;
    const P pm = pk::pset1<P>(m);
    P acc = zero;
    for (index_t i = 0; i < np; i += L) {
      const P d = pk::psub(pk::pload<P>(buf.a + i), pm);
      acc = pk::padd(acc, pk::pselect(pk::pcmp_lt(d, lo), zero, exp_nonpos(d)));
    }
    const double mc = double(m), sc = double(pk::predux(acc));
    if (mc > M) {
      S = S * exp_(M - mc) + sc;
      M = mc;
    } else {
      S += sc * exp_(mc - M);
    }
  }
  return M == -inf<double>() ? -inf<double>() : M + log_(S) - lse_s;
}

using estimators::no_dense;  // estimators/no_dense.hpp
using estimators::reads_q;

/// A row's log-sum-exp as seen by the element loops: log p_j = (a_j - C) - delta with
/// C = W(lse) and delta = W(lse - C). a_j - C is exact when a_j and C are within a factor of
/// two (Sterbenz), so log-probabilities keep full precision however large a common offset of
/// the logits is (a single subtraction of W(lse) would carry lse's rounding, ~1e-4 at 3000).
template <class W>
struct lse_split {
  W C = 0, delta = 0;
  lse_split() = default;
  explicit lse_split(double lse) noexcept : C(static_cast<W>(lse)), delta(static_cast<W>(lse - double(static_cast<W>(lse)))) {}
  W log_prob(W a) const noexcept { return (a - C) - delta; }
};

/// Probabilities of one chunk of a row (into dst[0, np)).
///   fp32 work: p_j = e^{a_j - M_c} * e^{M_c - lse}, M_c the row's running maximum at this
///     chunk, so p is bit-identical whether pass 1 kept e^{a_j - M_c} (`kept`, with its M_c)
///     or it is recomputed here (one exp);
///   fp64 work: p_j = e^{log p_j} directly (one exp, the most accurate form; fp64 rows are
///     never the fast path, and pass 1 keeps nothing for them).
template <class W>
struct prob_state {
  W M = -inf<W>();
  W f = W(0);  // e^{M - lse} for the current M
  double lse = 0;
  lse_split<W> split;
  explicit prob_state(double lse_) noexcept : lse(lse_), split(lse_) {}
};
template <class W>
TROPD_HOST_INLINE void chunk_probs(const W* x, const W* kept, W kept_M, const range_info<W>& r, index_t np, prob_state<W>& st,
                        W* dst, const prefetch_plan& pf = {}) noexcept {
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  const P zero = pk::pset1<P>(W(0)), lo = pk::pset1<P>(exp_floor<W>);
  if constexpr (!reuse_exps<W>) {
    const P C = pk::pset1<P>(st.split.C), d = pk::pset1<P>(st.split.delta);
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      const P lp = pk::psub(pk::psub(pk::ploadu<P>(x + i), C), d);
      pk::pstore(dst + i, pk::pselect(pk::pcmp_lt(lp, lo), zero, exp_nonpos(lp)));  // -inf, underflow: 0
    }
    return;
  }
  bool masked = true;  // some e^{x - M} may be -inf or below exp_floor: mask those to 0
  W M2;
  if (kept) {
    M2 = kept_M;
  } else {
    M2 = max_(st.M, r.max);
    masked = r.has_ninf || !(r.min - M2 >= exp_floor<W>);
  }
  if (M2 != st.M || st.f == W(0)) {
    st.M = M2;
    st.f = M2 > -inf<W>() ? static_cast<W>(exp_(double(M2) - st.lse)) : W(0);
  }
  const P f = pk::pset1<P>(st.f);
  if (st.M == -inf<W>()) {
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      pk::pstore(dst + i, zero);
    }
    return;
  }
  if (kept) {
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      pk::pstore(dst + i, pk::pmul(pk::ploadu<P>(kept + i), f));
    }
    return;
  }
  const P m = pk::pset1<P>(st.M);
  if (masked) {
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      const P da = pk::psub(pk::ploadu<P>(x + i), m);
      const P w = pk::pselect(pk::pcmp_lt(da, lo), zero, exp_nonpos(da));
      pk::pstore(dst + i, pk::pmul(w, f));
    }
  } else {
    for (index_t i = 0; i < np; i += L) {
      pf.at(i / L);
      pk::pstore(dst + i, pk::pmul(exp_nonpos<false>(pk::psub(pk::ploadu<P>(x + i), m)), f));  // >= exp_floor
    }
  }
}

/// Divergences whose per-element rules read log m (JSD): the backend computes log m for a
/// whole chunk with packets through the policy's own log_m<Ops> (one log per element, from
/// the chunk's probabilities) and calls its terms_lm / grad_lm with it.
template <class Est>
concept mixture_divergence = requires(const Est& e, float x, float& t, const estimators::row_summary& r) {
  { e.template log_m<estimators::scalar_ops<float>, float>(x, x) } -> std::convertible_to<float>;
  e.terms_lm(x, x, x, x, x, t, t);
  { e.grad_lm(x, x, x, x, x, r) } -> std::convertible_to<float>;
};

/// dst = est.log_m(p, q) over a chunk (packets of the policy's rule).
template <class W, class Est>
TROPD_HOST_INLINE void chunk_log_m(const Est& est, const W* p, const W* q, index_t np, W* dst) noexcept {
  using P = packet_t<W>;
  constexpr index_t L = lanes<W>;
  for (index_t i = 0; i < np; i += L)
    pk::pstore(dst + i, est.template log_m<packet_ops<W>, P>(pk::ploadu<P>(p + i), pk::ploadu<P>(q + i)));
}

/// The element loop of pass 2: g[i] = G(wd * est.grad(log p_i, log q_i, p_i, q_i, s) - wg * p_i),
/// or G(-wg * p_i) without a dense term (mixture divergences: grad_lm with the chunk's log m).
/// Everything the loop reads is a by-value parameter or a restrict pointer, so the compiler can
/// vectorise it (a full chunk also has a constant trip count, which GCC's -O2 cost model needs).
template <bool dense, index_t Fixed, class W, class G, class Est>
TROPD_HOST_INLINE void grad_elements(const Est est, const W* __restrict a, const W* __restrict b, const W* __restrict p,
                          const W* __restrict q, const W* __restrict lm, G* __restrict g, index_t n, const W wd,
                          const W wg, const lse_split<W> ls, const lse_split<W> lt,
                          const estimators::row_summary s) noexcept {
  const index_t m = Fixed > 0 ? Fixed : n;
  for (index_t i = 0; i < m; ++i) {
    if constexpr (!dense) {
      g[i] = static_cast<G>(-wg * p[i]);
    } else if constexpr (mixture_divergence<Est>) {
      g[i] = static_cast<G>(wd * est.grad_lm(ls.log_prob(a[i]), lt.log_prob(b[i]), lm[i], p[i], q[i], s) - wg * p[i]);
    } else {
      g[i] = static_cast<G>(wd * est.grad(ls.log_prob(a[i]), lt.log_prob(b[i]), p[i], q[i], s) - wg * p[i]);
    }
  }
}

/// Estimators that expose their second-pass terms per element (terms / terms_lm), so the
/// backend can sum them vectorised; others are summed through accumulate().
template <class Est>
concept has_terms = requires(const Est& e, float x, float& t) { e.terms(x, x, x, x, t, t); } ||
                    requires(const Est& e, float x, float& t) { e.terms_lm(x, x, x, x, x, t, t); };

template <index_t Fixed, class W, class Est>
TROPD_HOST_INLINE void second_terms(const Est est, const W* __restrict a, const W* __restrict b, const W* __restrict p,
                         const W* __restrict q, const W* __restrict lm, W* __restrict t0, W* __restrict t1, index_t n,
                         const lse_split<W> ls, const lse_split<W> lt) noexcept {
  const index_t m = Fixed > 0 ? Fixed : n;
  for (index_t i = 0; i < m; ++i) {
    if constexpr (mixture_divergence<Est>)
      est.terms_lm(ls.log_prob(a[i]), lt.log_prob(b[i]), lm[i], p[i], q[i], t0[i], t1[i]);
    else
      est.terms(ls.log_prob(a[i]), lt.log_prob(b[i]), p[i], q[i], t0[i], t1[i]);
  }
}


/// Pass 1b: the second-pass sums of an estimator (JSD, TV) into s.second. With the row's
/// pass-1 exponentials kept (buf.kept) it needs no exp; a mixture divergence takes one log
/// per element (kept for the gradient pass when buf.keep_lm is allocated).
template <class W, class TS, class TT, class Est>
inline void row_pass1b(const Est& est, const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt, row_scratch<W>& buf,
                       estimators::row_summary& s) noexcept {
  double acc[2] = {0, 0};
  prob_state<W> ps(s.lse_s), qs(s.lse_t);
  const bool kept = buf.kept && buf.keep_teacher;
  for (index_t c0 = 0, c = 0; c0 < V; c0 += chunk, ++c) {
    const index_t n = std::min(chunk, V - c0), np = padded<W>(n);
    const W *A = buf.a, *B = buf.b;
    const range_info<W> ra = stage_chunk<W, TS>(zs + c0, n, inv_ts, buf.a, A);
    const range_info<W> rb = stage_chunk<W, TT>(zt + c0, n, inv_tt, buf.b, B);
    prefetch_plan pf;
    pf.ahead(zs, c0, V);
    pf.ahead(zt, c0, V);
    if (kept) {
      pf.ahead(buf.keep_w.p, c0, V);
      pf.ahead(buf.keep_v.p, c0, V);
    }
    chunk_probs(A, kept ? buf.keep_w.p + c0 : nullptr, kept ? buf.keep_ms[static_cast<size_t>(c)] : W(0), ra, np, ps, buf.wa, pf);
    chunk_probs(B, kept ? buf.keep_v.p + c0 : nullptr, kept ? buf.keep_mt[static_cast<size_t>(c)] : W(0), rb, np, qs, buf.wb);
    W* lm = buf.lm;
    if constexpr (mixture_divergence<Est>) {
      if (buf.keep && buf.keep_lm.p != nullptr) lm = buf.keep_lm.p + c0;  // kept for the gradient pass
      chunk_log_m(est, buf.wa, buf.wb, np, lm);
    }
    if constexpr (has_terms<Est>) {
      // Per-element terms into two buffers (a vectorised loop over the policy's rule), then
      // packet sums: per chunk in W, across chunks in double.
      if (n == chunk) second_terms<chunk>(est, A, B, buf.wa, buf.wb, lm, buf.t0, buf.t1, n, ps.split, qs.split);
      else second_terms<0>(est, A, B, buf.wa, buf.wb, lm, buf.t0, buf.t1, n, ps.split, qs.split);
      acc[0] += double(packet_sum(buf.t0, n));
      acc[1] += double(packet_sum(buf.t1, n));
    } else {
      // Four interleaved partial sums (independent dependency chains, kept in registers); a
      // fixed order, so the result does not depend on the order of work or the thread count.
      double p0[2] = {0, 0}, p1[2] = {0, 0}, p2[2] = {0, 0}, p3[2] = {0, 0};
      const lse_split<W> ss = ps.split, st = qs.split;
      auto one = [&](index_t i, double* part) {
        if constexpr (mixture_divergence<Est>)
        {
          W t0, t1;
          est.terms_lm(ss.log_prob(A[i]), st.log_prob(B[i]), lm[i], buf.wa[i], buf.wb[i], t0, t1);
          part[0] += double(t0);
          part[1] += double(t1);
        } else
          est.accumulate(ss.log_prob(A[i]), st.log_prob(B[i]), buf.wa[i], buf.wb[i], part);
      };
      index_t i = 0;
      for (; i + 4 <= n; i += 4) {
        one(i, p0);
        one(i + 1, p1);
        one(i + 2, p2);
        one(i + 3, p3);
      }
      double* tail[3] = {p0, p1, p2};
      for (index_t j = 0; i < n; ++i, ++j) one(i, tail[j]);
      acc[0] += (p0[0] + p1[0]) + (p2[0] + p3[0]);
      acc[1] += (p0[1] + p1[1]) + (p2[1] + p3[1]);
    }
  }
  s.second[0] = acc[0];
  s.second[1] = acc[1];
  buf.lm_kept = mixture_divergence<Est> && buf.keep && buf.keep_lm.p != nullptr;
}


/// Pass 2: writes out[j] = scale * (w * est.grad_j + sum_{entries at j} g_e - p_j * P_j), the
/// row's dense term (w: its weight) and sparse terms (core/sparse_terms.hpp).
/// Returns -1, or the first column whose value is not finite in G (the row is then written
/// up to and including that column's chunk; the caller reports errc::infinite_divergence).
/// Uses the exponentials pass 1 kept (buf.kept) or recomputes them (one exp per element
/// and per probability the estimator reads); reads the teacher row only for a dense term.
template <class W, class TS, class TT, class Est, class G>
inline index_t row_pass2(const Est& est, const TS* zs, const TT* zt, index_t V, W inv_ts, W inv_tt, row_scratch<W>& buf,
                      const estimators::row_summary& s_in, double w, const sparse_terms& sp, double scale, G* out,
                      bool stream = false) noexcept {
  G* g = reinterpret_cast<G*>(buf.g);
  if (scale == 0.0) {  // prompt rows and rows without a term: an exact zero gradient
    for (index_t i = 0; i < chunk; ++i) g[i] = G(0);
    for (index_t c0 = 0; c0 < V; c0 += chunk) store_chunk(out + c0, g, std::min(chunk, V - c0), stream);
    if (stream) stream_fence();
    return -1;
  }
  const estimators::row_summary s = s_in;  // a local copy: provably not aliased by the stores
  const double gsum = sp.sum();
  const W wd = W(w * scale), wg = W(sp.p_coef_other(gsum) * scale);
  const double wl = sp.p_coef_listed(gsum) * scale;  // p_j's coefficient at a listed id (core/sparse_terms.hpp)
  // Entries sorted by id (stable: a listed entry precedes the sampled token at the same id,
  // and equal ids keep their order, so the sums do not depend on the sort).
  const size_t ns = static_cast<size_t>(sp.n);
  buf.sp_ids.resize(ns);
  buf.sp_coef.resize(ns);
  buf.sp_listed.resize(ns);
  buf.sp_order.resize(ns);
  for (int i = 0; i < sp.n; ++i) buf.sp_order[static_cast<size_t>(i)] = i;
  std::stable_sort(buf.sp_order.begin(), buf.sp_order.end(), [&](int x, int y) { return sp.ids[x] < sp.ids[y]; });
  for (size_t i = 0; i < ns; ++i) {
    const int e = buf.sp_order[i];
    buf.sp_ids[i] = sp.ids[e];
    buf.sp_coef[i] = sp.coef[e] * scale;
    buf.sp_listed[i] = e < sp.n_listed ? 1 : 0;
  }
  const bool split = sp.split();
  constexpr bool dense = !std::is_same_v<Est, no_dense>;
  constexpr bool need_q = reads_q<Est>;
  const bool kept = buf.kept;
  prob_state<W> ps(s.lse_s), qs(s.lse_t);
  const lse_split<W> ss = ps.split, st = qs.split;
  if constexpr (dense && !need_q) std::memset(buf.wb, 0, sizeof buf.wb);  // q is not read; keep it defined
  int next = 0;
  for (index_t c0 = 0, c = 0; c0 < V; c0 += chunk, ++c) {
    const index_t n = std::min(chunk, V - c0), np = padded<W>(n);
    const size_t cs = static_cast<size_t>(c);
    range_info<W> ra{0, true, false}, rb{0, true, false};
    const W *A = buf.a, *B = buf.b;
    if (!kept) ra = stage_chunk<W, TS>(zs + c0, n, inv_ts, buf.a, A);
    else if (dense) A = stage_values(zs + c0, n, inv_ts, buf.a);
    prefetch_plan pf;
    if (dense || !kept) pf.ahead(zs, c0, V);
    if (dense) pf.ahead(zt, c0, V);
    if (kept) pf.ahead(buf.keep_w.p, c0, V);
    if (kept && need_q && buf.keep_teacher) pf.ahead(buf.keep_v.p, c0, V);
    chunk_probs(A, kept ? buf.keep_w.p + c0 : nullptr, kept ? buf.keep_ms[cs] : W(0), ra, np, ps, buf.wa, pf);
    // Without streaming the chunk is computed straight into the output row.
    G* dst = stream ? g : out + c0;
    const W* lm = buf.lm;
    if constexpr (dense) {
      const bool kq = kept && buf.keep_teacher;
      if (need_q && !kq) rb = stage_chunk<W, TT>(zt + c0, n, inv_tt, buf.b, B);
      else B = stage_values(zt + c0, n, inv_tt, buf.b);
      if constexpr (need_q) chunk_probs(B, kq ? buf.keep_v.p + c0 : nullptr, kq ? buf.keep_mt[cs] : W(0), rb, np, qs, buf.wb);
      if constexpr (mixture_divergence<Est>) {
        if (buf.lm_kept) lm = buf.keep_lm.p + c0;  // pass 1b's log m of this row
        else chunk_log_m(est, buf.wa, buf.wb, np, buf.lm);
      }
      if (n == chunk) grad_elements<true, chunk>(est, A, B, buf.wa, buf.wb, lm, dst, n, wd, wg, ss, st, s);
      else grad_elements<true, 0>(est, A, B, buf.wa, buf.wb, lm, dst, n, wd, wg, ss, st, s);
    } else {
      if (n == chunk) grad_elements<false, chunk>(est, A, B, buf.wa, buf.wb, buf.lm, dst, n, wd, wg, ss, st, s);
      else grad_elements<false, 0>(est, A, B, buf.wa, buf.wb, buf.lm, dst, n, wd, wg, ss, st, s);
    }
    for (; next < sp.n && buf.sp_ids[static_cast<size_t>(next)] < c0 + n; ++next) {
      const size_t e = static_cast<size_t>(next);
      const index_t j = buf.sp_ids[e] - c0;
      if (split && buf.sp_listed[e]) {  // a listed id: p_j's own coefficient, written, not corrected
        G d = G(0);
        if constexpr (dense) grad_elements<true, 1>(est, A + j, B + j, buf.wa + j, buf.wb + j, lm + j, &d, 1, wd, W(0), ss, st, s);
        dst[j] = static_cast<G>(double(d) - double(buf.wa[j]) * wl);
      }
      dst[j] += static_cast<G>(buf.sp_coef[e]);
    }
    // Every written value must fit G (an overflowing grad_scale / T_S, or a coefficient at
    // the edge of the work type's range, must not be written as inf / NaN with an ok status).
    if (!all_finite(dst, n)) {
      index_t j = 0;
      while (is_finite(dst[j])) ++j;
      if (stream) {
        store_chunk(out + c0, g, n, true);
        stream_fence();
      }
      return c0 + j;
    }
    if (stream) store_chunk(out + c0, g, n, true);
  }
  if (stream) stream_fence();
  return -1;
}


inline status check_temperatures(const row_options& o) noexcept {
  return checks::temperatures(o.student_temperature, o.teacher_temperature);
}

/// Shapes (core/checks.hpp, shared with the GPU backend), then grad_scale values (host memory).
template <class TS, class G>
inline status check_student_and_outputs(matrix_view<const TS> student, vector_view<double> loss,
                                        matrix_view<G> grad, vector_view<const double> grad_scale) noexcept {
  TROPD_TRY(checks::student_rows(student, loss, grad, grad_scale));
  for (index_t r = 0; r < grad_scale.size; ++r)
    if (!is_finite(grad_scale[r])) return make_error(errc::non_finite_input, "grad_scale is not finite", r);
  return {};
}

template <class TT>
inline status check_teacher_rows(matrix_view<const TT> teacher, index_t rows, index_t cols) noexcept {
  return checks::teacher_rows(teacher, rows, cols);
}

/// Whether a gradient of this size is written with non-temporal stores.
template <class G>
inline bool stream_gradient(matrix_view<G> grad) noexcept {
  return double(grad.rows) * double(grad.cols) * double(sizeof(G)) >= stream_bytes;
}

/// The status of a gradient row written by row_pass2 (bad: its return value).
inline status gradient_status(index_t row, index_t bad) noexcept {
  if (bad < 0) return {};
  return make_error(errc::infinite_divergence,
                    "the gradient does not fit the output type (grad_scale / temperature too large, or logits at the edge "
                    "of the range); gradient rows may be partly written",
                    row, bad);
}

/// Checks that every value[r] is finite, then writes loss[r] = value[r] (all or nothing).
inline status write_losses(vector_view<double> loss, const std::vector<double>& value) noexcept {
  for (index_t r = 0; r < loss.size; ++r)
    if (!is_finite(value[static_cast<size_t>(r)]))
      return make_error(errc::infinite_divergence, "the loss is not finite in double (logits at the edge of the range)", r);
  for (index_t r = 0; r < loss.size; ++r) loss[r] = value[static_cast<size_t>(r)];
  return {};
}


}  // namespace tropd::host::detail
