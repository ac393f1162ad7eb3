// fuzz/target_topk.hpp: teacher top-k forward KL per row, host::topk_forward_kl_rows, with
// full teacher logits (the top k are selected) and with given teacher lists, every tail
// policy, against the naive long-double reference (naive::topk_ids, naive::topk_forward_kl)
// or a documented error.
//
// Decoded case: mode (logits / lists), rows N in [1, 8], V in [1, 64], element types, tail
// (also an unknown enum value), k (in and out of domain, k > V), temperatures, grad_scale,
// threads, fused order; for lists: width K in [1, 8], ids (also out of range, negative,
// repeated), log-probs (normalised from random logits, or unnormalised grid values with
// -inf padding, NaN / +inf from real input bytes); then the logits.
//
// Rules checked (docs/robustness.md):
//   * k < 1 or an unknown tail -> invalid_parameter (also for lists, where k is otherwise unused);
//   * lists: first bad entry over all rows (row order, then entry order): NaN/+inf log-prob
//     -> non_finite_input (row, entry); a non-padding id outside [0, V) -> id_out_of_range
//     (row, entry); an id repeated among non-padding entries -> duplicate_topk_id (row, entry);
//   * then per row: NaN/+inf logits -> non_finite_input; a row of -inf -> no_finite_entry;
//     the student at -inf on a non-padding teacher id -> infinite_divergence (row, entry);
//     a list without a finite entry -> invalid_topk_list; raw / tail_bucket with S_K > 1 + 1e-4
//     -> invalid_topk_list; tail_bucket with a non-empty teacher tail (> 1e-6) and no finite
//     student logit outside the list -> infinite_divergence (and only then: a student tail
//     of any size is a finite value, checked against a reference that sums 1 - P_K directly);
//     a finite logit that overflows once scaled -> unsupported (as in the rows target);
//   * output checks, range zone, finiteness of ok results and poison as in the rows target;
//   * otherwise value and gradient within a tolerance from the work type's epsilon, the
//     logit magnitudes and the conditioning of log(1 - P_K).
#pragma once

#include <climits>

#include "judge.hpp"
#include "reference/naive.hpp"

namespace tropd_fuzz::topk {

namespace est = tropd::estimators;
namespace naive = tropd_test::naive;

struct cfg {
  bool lists = false;
  int N = 1, V = 1, K = 1;  // K: list width (lists mode)
  ety ts = ety::f32, tt = ety::f32;
  bool grad_double = false, want_grad = true;
  int tail = 1;
  int k = 64;
  double Ts = 1, Tt = 1;
  int threads = 1;
  bool fused = false;
  std::vector<double> gscale;
  value_cfg vs, vt;
  int list_mode = 0;  // 0: normalised from random logits, 1: grid values (unnormalised)
  double list_scale = 1;
  bool list_specials = false;

  std::string describe() const {
    std::string s = cat("topk: mode=", lists ? "lists" : "logits", " N=", N, " V=", V, " K=", K, " k=", k, " tail=", tail,
                        " TS=", ety_name(ts), " TT=", ety_name(tt), " G=", grad_double ? "f64" : "f32", " grad=", want_grad,
                        " Ts=", Ts, " Tt=", Tt, " threads=", threads, " fused=", fused, " student{scale=", vs.scale,
                        " offset=", vs.offset, " -inf=", vs.neg_inf, " specials=", vs.specials, "}");
    if (lists) s += cat(" list{mode=", list_mode, " scale=", list_scale, " specials=", list_specials, "}");
    else s += cat(" teacher{scale=", vt.scale, " offset=", vt.offset, " -inf=", vt.neg_inf, " specials=", vt.specials, "}");
    if (!gscale.empty()) {
      s += " grad_scale=[";
      for (double g : gscale) s += cat(g, " ");
      s += "]";
    }
    return s;
  }
};

/// Runs one case. TT = void: lists mode.
template <class TS, class TT, class G>
void run(const cfg& c, input& in) {
  constexpr bool lists = std::is_void_v<TT>;
  using TTe = std::conditional_t<lists, float, TT>;
  const int N = c.N, V = c.V;
  const ld epsW = work_eps<TS, TTe>(), maxW = work_max<TS, TTe>(), minW = work_min_normal<TS, TTe>();
  const ld epsG = std::numeric_limits<G>::epsilon(), maxG = std::numeric_limits<G>::max(), minG = std::numeric_limits<G>::min();
  constexpr bool W_double = std::is_same_v<TS, double> || std::is_same_v<TTe, double>;
  const ld floor_abs = W_double ? 1e-290L : 64 * minW;
  value_cfg vs = c.vs, vt = c.vt;
  vs.type_max = max_finite<TS>();
  vt.type_max = max_finite<TTe>();

  std::vector<TS> zs(static_cast<size_t>(N * V));
  for (auto& x : zs) x = store<TS>(element(in, vs));
  std::vector<TTe> zt(lists ? 0 : static_cast<size_t>(N * V));
  for (auto& x : zt) x = store<TTe>(element(in, vt));
  const int K = lists ? c.K : 0;
  std::vector<int32_t> lid(static_cast<size_t>(N * K));
  std::vector<float> llq(static_cast<size_t>(N * K));
  if constexpr (lists) {
    for (int r = 0; r < N; ++r) {
      // Normalised mode: log-softmax of random logits over K + extra outcomes (S_K < 1), or
      // over exactly K (S_K = 1 up to rounding).
      std::vector<ld> raw(static_cast<size_t>(K));
      for (auto& x : raw) x = (in.pick(240) - 120) / 40.0L * c.list_scale;
      const int extra = in.pick(3);
      ld m = -ldinf;
      for (ld x : raw) m = std::max(m, x);
      ld sum = 0;
      for (ld x : raw) sum += std::exp(x - m);
      sum += extra * std::exp(-m);  // extra outcomes with logit 0
      for (int i = 0; i < K; ++i) {
        bool real = false;
        const uint8_t b = in.u8(&real);
        float lq;
        if (c.list_mode == 0) lq = to_float_sat(static_cast<double>(raw[static_cast<size_t>(i)] - m - std::log(sum)));
        else lq = to_float_sat((static_cast<int>(b % 240) - 120) / 40.0 * c.list_scale);
        if (b >= 240 && real) {
          if (b < 246) lq = -finf;  // padding
          else if (c.list_specials && b == 246) lq = std::numeric_limits<float>::quiet_NaN();
          else if (c.list_specials && b == 247) lq = finf;
          else if (c.list_specials && b == 248) lq = 800.0f;    // exp overflows double
          else if (c.list_specials && b == 249) lq = -800.0f;   // exp underflows double
        } else if (b >= 250 && !real) {
          lq = -finf;
        }
        llq[static_cast<size_t>(r * K + i)] = lq;
        // Ids: distinct by default (a shuffled prefix), sometimes out of range or repeated.
        const uint8_t bi = in.u8(&real);
        int32_t id = static_cast<int32_t>((bi % V + i * 7) % V);
        if (i > 0 && bi >= 200 && bi < 230) id = lid[static_cast<size_t>(r * K + (bi % i))];  // repeat
        if (real && bi >= 250) {
          const int32_t bad[] = {-1, V, V + 3, INT_MIN, INT_MAX, -2};
          id = bad[bi - 250];
        }
        lid[static_cast<size_t>(r * K + i)] = id;
      }
    }
  }
  auto zval = [&](int r, int v) { return value_of(zs[static_cast<size_t>(r * V + v)]); };
  auto uval = [&](int r, int v) -> ld {
    if constexpr (lists) return 0;
    else return value_of(zt[static_cast<size_t>(r * V + v)]);
  };

  std::vector<double> loss(static_cast<size_t>(N), poison<double>());
  std::vector<G> grad(c.want_grad ? static_cast<size_t>(N * V) : 0, poison<G>());
  tropd::host::row_options opt;
  opt.student_temperature = c.Ts;
  opt.teacher_temperature = c.Tt;
  opt.threads = c.threads;
  opt.order = c.fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
  // Given lists: the estimator's k is the lists' width (the library rejects a mismatch; that
  // rule has its unit test), except where k itself is invalid.
  const est::topk_forward_kl e{lists && c.k >= 1 ? K : c.k, static_cast<est::topk_tail>(c.tail)};
  const naive::tail ntail = c.tail == 0 ? naive::tail::raw : (c.tail == 1 ? naive::tail::renormalised : naive::tail::tail_bucket);

  // ---- Global errors.
  std::vector<error_outcome> global;
  auto T_ok = [](double T) { return T > 0 && std::isfinite(T); };
  if (c.k < 1 || c.tail < 0 || c.tail > 2) global.push_back({errc::invalid_parameter, -1, -1, ""});
  else if (!T_ok(c.Ts) || !T_ok(c.Tt)) global.push_back({errc::invalid_parameter, -1, -1, ""});
  else {
    for (int r = 0; r < static_cast<int>(c.gscale.size()) && global.empty(); ++r)
      if (!std::isfinite(c.gscale[static_cast<size_t>(r)])) global.push_back({errc::non_finite_input, r, -1, ""});
  }
  if (global.empty() && lists) {
    for (int r = 0; r < N && global.empty(); ++r)
      for (int i = 0; i < K && global.empty(); ++i) {
        const float lq = llq[static_cast<size_t>(r * K + i)];
        const int32_t id = lid[static_cast<size_t>(r * K + i)];
        if (std::isnan(lq) || lq == finf) global.push_back({errc::non_finite_input, r, i, ""});
        else if (lq == -finf) continue;
        else if (id < 0 || id >= V) global.push_back({errc::id_out_of_range, r, i, ""});
        else
          for (int j = 0; j < i; ++j)
            if (llq[static_cast<size_t>(r * K + j)] != -finf && lid[static_cast<size_t>(r * K + j)] == id) {
              global.push_back({errc::duplicate_topk_id, r, i, ""});
              break;
            }
      }
  }
  // (k > V selects the whole row: issue B5, fixed; k up to INT_MAX is decoded.)

  // ---- Per-row expectations.
  std::vector<row_expect> rx(static_cast<size_t>(N));
  for (int r = 0; r < N && global.empty(); ++r) {
    row_expect& ex = rx[static_cast<size_t>(r)];
    std::vector<ld> z(static_cast<size_t>(V)), u(static_cast<size_t>(V));
    for (int v = 0; v < V; ++v) {
      z[static_cast<size_t>(v)] = zval(r, v);
      u[static_cast<size_t>(v)] = uval(r, v);
    }
    // Range zone (as in the rows target).
    {
      ld amax = -ldinf, amin = ldinf, bmax = -ldinf, bmin = ldinf;
      bool range = false;
      for (int v = 0; v < V; ++v) {
        if (std::isfinite(z[static_cast<size_t>(v)])) {
          const ld a = z[static_cast<size_t>(v)] / c.Ts;
          if (std::fabs(a) > maxW / 2) range = true;
          amax = std::max(amax, a);
          amin = std::min(amin, a);
        }
        if (!lists && std::isfinite(u[static_cast<size_t>(v)])) {
          const ld b = u[static_cast<size_t>(v)] / c.Tt;
          if (std::fabs(b) > maxW / 2) range = true;
          bmax = std::max(bmax, b);
          bmin = std::min(bmin, b);
        }
      }
      const ld sa = amax > amin ? amax - amin : 0, sb = bmax > bmin ? bmax - bmin : 0;
      if ((sa + sb) * (V + 1) > maxW / 2) range = true;
      ex.range = range;
      // B8 (see the rows target): a finite logit of magnitude near the work type's limit.
      for (int v = 0; v < V; ++v)
        for (ld x : {z[static_cast<size_t>(v)] / c.Ts, lists ? 0 : u[static_cast<size_t>(v)] / c.Tt})
          if (std::isfinite(x) && std::fabs(x) > (W_double ? 1e300L : 1e36L)) ex.huge = true;
      if (range)
        for (errc k : {errc::no_finite_entry, errc::infinite_divergence, errc::invalid_topk_list}) ex.late.push_back({k, r, any_pos, ""});
    }
    auto all_neg_inf = [&](const std::vector<ld>& x) {
      for (ld v : x)
        if (v != -ldinf) return false;
      return true;
    };
    // First-pass rejection (R1 rule, see first_stage_fault): the student, then the teacher.
    {
      using W = std::conditional_t<W_double, double, float>;
      stage_fault f = first_stage_fault<W>(z, c.Ts);
      if (f.col < 0 && !lists) f = first_stage_fault<W>(u, c.Tt);
      if (f.col >= 0) {
        ex.errors.push_back({f.code, r, f.col, ""});
        ex.value_ok = false;
        ex.strict = true;
        continue;
      }
    }
    if (all_neg_inf(z) || (!lists && all_neg_inf(u))) {
      ex.errors.push_back({errc::no_finite_entry, r, -1, ""});
      ex.value_ok = false;
      ex.strict = true;
      continue;
    }
    // A gradient scale beyond the output / work type's range (K4, fixed): the output check
    // reports infinite_divergence (or the gradient is finite and correct).
    if (c.want_grad) {
      const ld gs0 = c.gscale.empty() ? 1 : c.gscale[static_cast<size_t>(r)];
      if (std::fabs(gs0 / c.Ts) > std::min(maxG, maxW) / 2) ex.late.push_back({errc::infinite_divergence, r, any_pos, ""});
    }
    // The list: given, or the teacher's top k (ties: lower id; -inf never selected).
    ld lse_a = 0;
    const std::vector<ld> ls = log_softmax(z, c.Ts, &lse_a);
    std::vector<int> ids;
    std::vector<ld> lq;
    std::vector<ld> lt, rq;
    bool near_tie = false, near_tie_boundary = false;
    ld bmax = -ldinf;
    if constexpr (lists) {
      for (int i = 0; i < K; ++i) {
        const float x = llq[static_cast<size_t>(r * K + i)];
        ids.push_back(x == -finf ? 0 : lid[static_cast<size_t>(r * K + i)]);
        lq.push_back(x);
      }
      // Given log-probs are exact inputs, but the library renormalises them in double:
      // lq - log S_K carries ~eps64 (|lq| + |max lq|) (a list at -3e38 cannot resolve log 2).
      ld lqm = 0;
      for (ld x : lq)
        if (std::isfinite(x)) lqm = std::max(lqm, std::fabs(x));
      for (ld x : lq) rq.push_back(std::isfinite(x) ? 4 * ld(std::numeric_limits<double>::epsilon()) * (1 + std::fabs(x) + lqm) : 0);
    } else {
      ld lse_b = 0;
      lt = log_softmax(u, c.Tt, &lse_b);
      for (int v = 0; v < V; ++v) bmax = std::max(bmax, u[static_cast<size_t>(v)] / c.Tt);
      // Selected on the scaled logits (as the library does): log-probs in long double can
      // merge values that differ by less than their resolution (1e-41 vs 0).
      std::vector<ld> b_scaled;
      for (int v = 0; v < V; ++v) b_scaled.push_back(u[static_cast<size_t>(v)] / c.Tt);
      ids = naive::topk_ids(b_scaled, c.k);
      // The library selects among scaled values rounded to the work type: ties may form.
      // Near ties inside the list change only the order (the position of an error); a near
      // tie across the k-th place changes the set (values are then not compared).
      // (Compared on the scaled logits the library selects on: distinct values closer than
      // the work type resolves, subnormals included, may tie there or order differently.)
      std::vector<ld> sorted;
      for (int v = 0; v < V; ++v) sorted.push_back(u[static_cast<size_t>(v)] / c.Tt);
      std::sort(sorted.begin(), sorted.end(), std::greater<ld>());
      for (size_t i = 0; i + 1 < sorted.size() && i < static_cast<size_t>(std::max(1, c.k)); ++i)
        if (std::isfinite(sorted[i + 1]) && sorted[i] != sorted[i + 1] &&
            sorted[i] - sorted[i + 1] <= 8 * epsW * (std::fabs(sorted[i]) + std::fabs(sorted[i + 1])) + 64 * minW) {
          near_tie = true;
          if (i + 1 == static_cast<size_t>(c.k)) near_tie_boundary = true;
        }
      for (int id : ids) {
        lq.push_back(lt[static_cast<size_t>(id)]);
        rq.push_back(4 * epsW * (V + 8 + std::fabs(u[static_cast<size_t>(id)] / c.Tt) + std::fabs(bmax) + std::fabs(lse_b)));
      }
    }
    const int n = static_cast<int>(ids.size());
    // Student zero mass on a listed id.
    int zero_at = -1;
    for (int i = 0; i < n && zero_at < 0; ++i)
      if (lq[static_cast<size_t>(i)] != -ldinf && z[static_cast<size_t>(ids[static_cast<size_t>(i)])] == -ldinf) zero_at = i;
    if (zero_at >= 0) {
      // (With teacher logits the column is an entry of the library's internal list, whose
      // order is not part of the contract: any column.)
      ex.errors.push_back({errc::infinite_divergence, r, (near_tie || !lists) ? any_pos : zero_at, ""});
      ex.value_ok = false;
      // (from teacher logits spread beyond the work type, the listed log-prob itself may be
      // -inf there: the range zone accepts a value)
      ex.strict = lists;
      continue;
    }
    // Teacher and student masses on the list.
    ld SK = 0, PK = 0, lqmax = -ldinf;
    for (int i = 0; i < n; ++i)
      if (lq[static_cast<size_t>(i)] != -ldinf) {
        SK += std::exp(lq[static_cast<size_t>(i)]);
        PK += std::exp(ls[static_cast<size_t>(ids[static_cast<size_t>(i)])]);
        lqmax = std::max(lqmax, lq[static_cast<size_t>(i)]);
      }
    if (lqmax == -ldinf) {
      ex.errors.push_back({errc::invalid_topk_list, r, -1, ""});
      ex.value_ok = false;
      ex.strict = true;
      continue;
    }
    if (ntail != naive::tail::renormalised) {
      if (SK > 1 + 1e-4L + 1e-6L) {
        ex.errors.push_back({errc::invalid_topk_list, r, -1, ""});
        ex.value_ok = false;
        ex.strict = lists;  // (from teacher logits S_K carries the work type's rounding)
        continue;
      }
      if (SK > 1 + 1e-4L - 1e-6L) ex.errors.push_back({errc::invalid_topk_list, r, -1, ""});  // boundary: either
    }
    // (Unnormalised renormalised lists of any scale, log-probs above 709 or all below -745,
    // are legal: the library forms S_K in log space. Issues B2 / B3, fixed.)
    const ld SKc = std::min<ld>(SK, 1);
    // Error of S_K: from teacher logits it carries the work type's rounding of the log-probs
    // (rq); given lists only double's.
    ld serr = 0;
    for (int i = 0; i < n; ++i)
      if (lq[static_cast<size_t>(i)] != -ldinf) serr += std::exp(lq[static_cast<size_t>(i)]) * rq[static_cast<size_t>(i)];
    const bool tb = ntail == naive::tail::tail_bucket;
    const bool bucket = tb && 1 - SKc > 1e-6L;
    // A teacher tail within its error of the 1e-6 threshold: the library may take either side.
    const bool bucket_edge = tb && std::fabs((1 - SKc) - 1e-6L) <= 2 * serr + 1e-9L;
    if (bucket_edge) ex.skip_values();
    // Student mass outside the list, summed directly (1 - P_K without cancellation): zero
    // exactly when every other student logit is -inf (support), however small it is otherwise.
    ld rest = 0, log_rest = -ldinf;  // (log space: a tail of e^-1e29 underflows long double but not its log)
    bool rest_support = false;
    std::vector<char> in_list(static_cast<size_t>(V), 0);
    for (int i = 0; i < n; ++i)
      if (lq[static_cast<size_t>(i)] != -ldinf) in_list[static_cast<size_t>(ids[static_cast<size_t>(i)])] = 1;
    ld amag = 0;  // largest |scaled logit| of the student
    for (int v = 0; v < V; ++v) {
      if (std::isfinite(z[static_cast<size_t>(v)])) amag = std::max(amag, std::fabs(z[static_cast<size_t>(v)] / c.Ts));
      if (!in_list[static_cast<size_t>(v)] && ls[static_cast<size_t>(v)] != -ldinf) {
        log_rest = std::max(log_rest, ls[static_cast<size_t>(v)]);
        rest_support = true;
      }
    }
    if (rest_support) {
      ld sum = 0;
      for (int v = 0; v < V; ++v)
        if (!in_list[static_cast<size_t>(v)] && ls[static_cast<size_t>(v)] != -ldinf) sum += std::exp(ls[static_cast<size_t>(v)] - log_rest);
      log_rest += std::log(sum);
      rest = std::exp(log_rest);
    }
    // Precision of the student log-probs at the listed ids.
    ld dls_max = 0;
    for (int i = 0; i < n; ++i) {
      const ld a = std::fabs(z[static_cast<size_t>(ids[static_cast<size_t>(i)])] / c.Ts);
      dls_max = std::max(dls_max, 4 * epsW * (V + 8 + a + std::fabs(lse_a) * 2));
    }
    // Student log-probs known only to within ~1 nat (huge logits in the work type): the
    // result means nothing; an error or any finite result is accepted.
    const bool imprecise = dls_max > 0.5L;
    // Tail bucket (B6, fixed): infinite exactly when the teacher tail is non-empty and the
    // student has no finite logit outside the list; otherwise a finite value, however small
    // the student tail (the library computes log(1 - P_K) from the whole student row).
    if (tb && (bucket || bucket_edge) && !rest_support) {
      ex.errors.push_back({errc::infinite_divergence, r, -1, ""});
      if (!bucket_edge) {
        ex.value_ok = false;
        continue;
      }
    }
    const bool use_bucket = bucket && rest_support;
    // Reference value and gradient (naive). Renormalised lists are shifted by their maximum
    // (the value is invariant) so the naive code sums e^lq without over/underflow. The tail
    // bucket's term (1 - S_K) log((1 - S_K) / (1 - P_K)) is added here with 1 - P_K = rest
    // (the naive code forms 1 - P_K by subtraction, which long double cannot resolve for the
    // tails the library now handles, down to ~1e-40).
    std::vector<ld> lq_ref = lq;
    if (ntail == naive::tail::renormalised)
      for (ld& x : lq_ref)
        if (x != -ldinf) x -= lqmax;
    const naive::tail use_tail = tb ? naive::tail::raw : ntail;
    naive::value_grad ref = naive::topk_forward_kl(z, ids, lq_ref, use_tail, c.Ts);
    const ld tt = 1 - SKc;  // teacher tail
    if (use_bucket) {
      ref.value += tt * (std::log(tt) - log_rest);
      // d/da_j of the tail term: (1 - S_K) p_j on the list, -(1 - S_K) p_j P_K / (1 - P_K) off it.
      for (int v = 0; v < V; ++v) {
        const ld lsv = ls[static_cast<size_t>(v)];
        if (lsv == -ldinf) continue;
        ref.grad[static_cast<size_t>(v)] += (in_list[static_cast<size_t>(v)] ? tt * std::exp(lsv) : -tt * PK * std::exp(lsv - log_rest)) / c.Ts;
      }
    }
    if (!std::isfinite(ref.value)) {  // (a loss beyond double's range: the output check)
      ex.late.push_back({errc::infinite_divergence, r, any_pos, ""});
      if (imprecise) {  // (the long-double reference loses the log-probs too)
        ex.skip_values();
        continue;
      }
      ex.value_ok = false;
      continue;
    }
    // A loss at the edge of double's range (R2, fixed): infinite_divergence, never an ok status
    // with a non-finite loss.
    if (!(std::fabs(ref.value) <= std::numeric_limits<double>::max() / 4)) ex.late.push_back({errc::infinite_divergence, r, any_pos, ""});
    const ld gs = c.gscale.empty() ? 1 : c.gscale[static_cast<size_t>(r)];
    const ld scale = gs / c.Ts;
    // Tolerances.
    ld amax = -ldinf;
    for (int v = 0; v < V; ++v) amax = std::max(amax, z[static_cast<size_t>(v)] / c.Ts);
    const ld cond = use_bucket ? tt * std::exp(-log_rest) : 0;  // c = (1 - S_K) / (1 - P_K) (may be +inf)
    // Error of log(1 - P_K) as the library forms it: log1mexp of the listed log-probs where
    // the tail is above ~1e-3 (conditioning P_K / (1 - P_K)), else a direct log-sum-exp of
    // the entries outside the list in the work type.
    const ld dlt = 4 * epsW * (V + 8 + 2 * amag + 2 * std::fabs(lse_a)) +
                   (rest > 2e-4L ? (PK * dls_max + 4 * (n + 1) * ld(std::numeric_limits<double>::epsilon())) / rest : 0);
    ld vt = 0, csum = 0, cerr = 0;
    const ld SKn = ntail == naive::tail::renormalised ? SK : 1;
    for (int i = 0; i < n; ++i) {
      if (lq[static_cast<size_t>(i)] == -ldinf) continue;
      const ld qk = std::exp(lq[static_cast<size_t>(i)]) / SKn;
      const ld lsi = ls[static_cast<size_t>(ids[static_cast<size_t>(i)])];
      const ld dls = 4 * epsW * (V + 8 + std::fabs(z[static_cast<size_t>(ids[static_cast<size_t>(i)])] / c.Ts) + 2 * std::fabs(amax) + 2 * std::fabs(lse_a));
      vt += qk * (dls + rq[static_cast<size_t>(i)] * (1 + std::fabs(lq[static_cast<size_t>(i)] - lsi)));
      csum += qk;
      cerr += qk * rq[static_cast<size_t>(i)];
    }
    // c carries the relative error of log(1 - P_K) and of 1 - S_K (cerr absolute).
    const ld dcond = use_bucket ? dlt + cerr / tt : 0;
    if (use_bucket) vt += tt * dlt + cerr * (2 + std::fabs(log_rest) + std::fabs(std::log(tt)));
    ex.loss = ref.value;
    ex.loss_tol = 8 * vt + 8 * ld(std::numeric_limits<double>::epsilon()) * (n + 8) * (1 + std::fabs(ref.value)) + 1e-300L;
    ex.grad.assign(static_cast<size_t>(V), 0);
    ex.grad_tol.assign(static_cast<size_t>(V), 0);
    std::vector<ld> coef_at(static_cast<size_t>(V), 0);
    for (int i = 0; i < n; ++i)
      if (lq[static_cast<size_t>(i)] != -ldinf) coef_at[static_cast<size_t>(ids[static_cast<size_t>(i)])] += std::exp(lq[static_cast<size_t>(i)]) / SKn;
    ld gmax = 0;
    for (int v = 0; v < V; ++v) {
      const size_t j = static_cast<size_t>(v);
      const ld p = ls[j] == -ldinf ? 0 : std::exp(ls[j]);
      const ld relp = 4 * epsW * (V + 8 + (z[j] == -ldinf ? 0 : std::fabs(z[j] / c.Ts)) + std::fabs(amax) + std::fabs(lse_a));
      ex.grad[j] = ref.grad[j] * gs;
      gmax = std::isnan(ex.grad[j]) ? ldinf : std::max(gmax, std::fabs(ex.grad[j]));
      ld base = p * (relp * (csum + 1) + cerr) + coef_at[j] * (relp + 1e-15L) + (coef_at[j] > 0 ? cerr : 0);
      // Off the list the tail bucket's gradient is p_j (1 - c): c's error, and p_j's times |1 - c|.
      if (use_bucket && !in_list[j] && p > 0) base += p * (cond * dcond + relp * (1 + cond));
      // (grad_scale 0: exact zeros; a tail coefficient c = +inf must not make the tolerance NaN)
      ex.grad_tol[j] = (scale == 0 ? 0 : std::fabs(scale) * (16 * base + floor_abs * (1 + csum + cond))) + 4 * epsG * std::fabs(ex.grad[j]) +
                       4 * epsG * coef_at[j] * std::fabs(scale) + 2 * minG + 4 * minW;
    }
    ex.has_ref = true;
    ld rq_max = 0;
    for (ld x : rq) rq_max = std::max(rq_max, x);
    if (near_tie_boundary || imprecise || rq_max > 0.1L) ex.skip_values();
    // Gradient overflow (K4, fixed): the output check reports infinite_divergence; near the
    // edge either outcome, clearly beyond it only the error (terms of size scale * coefficient
    // are formed in the work type before they cancel).
    if (c.want_grad) {
      const ld lim = std::min(maxG, maxW);
      if (!(gmax <= lim / 2) || std::fabs(scale) * (1 + csum + cond) > lim / 2) {
        expect_gradient_overflow(ex, r, lim);
        if (!std::isfinite(gmax)) ex.skip_values();
      }
    }
  }
  accept_values_in_range_zone(rx);
  if (global.empty()) tolerate_flushed_grad_scale(rx, c.gscale, c.Ts, minW);

  // ---- Call.
  const auto sview = tropd::make_matrix<const TS>(zs.data(), N, V);
  const auto lview = tropd::vector_view<double>{loss.data(), N};
  const auto gview = c.want_grad ? tropd::make_matrix<G>(grad.data(), N, V) : tropd::matrix_view<G>{};
  const auto gsview = tropd::vector_view<const double>{c.gscale.data(), static_cast<index_t>(c.gscale.size())};
  tropd::status st;
  if constexpr (lists) {
    const tropd::host::topk_lists tl{tropd::make_matrix<const int32_t>(lid.data(), N, K), tropd::make_matrix<const float>(llq.data(), N, K)};
    st = tropd::host::topk_forward_kl_rows(e, sview, tl, lview, gview, opt, gsview);
  } else {
    st = tropd::host::topk_forward_kl_rows(e, sview, tropd::make_matrix<const TT>(zt.data(), N, V), lview, gview, opt, gsview);
  }
  note_outcome(st);
  if (std::getenv("TROPD_FUZZ_DUMP")) {
    for (int r = 0; r < N; ++r) {
      std::string d = cat("row ", r, " student:");
      for (int v = 0; v < V; ++v) d += cat(" ", static_cast<double>(zval(r, v)));
      if (lists) {
        d += " | list:";
        for (int i = 0; i < K; ++i) d += cat(" (", lid[static_cast<size_t>(r * K + i)], ", ", llq[static_cast<size_t>(r * K + i)], ")");
      } else {
        d += " | teacher:";
        for (int v = 0; v < V; ++v) d += cat(" ", static_cast<double>(uval(r, v)));
      }
      std::fprintf(stderr, "%s\n  loss %.17g (ref %.17g tol %.3g)\n", d.c_str(), loss[static_cast<size_t>(r)],
                   static_cast<double>(rx[static_cast<size_t>(r)].loss), static_cast<double>(rx[static_cast<size_t>(r)].loss_tol));
    }
    std::fprintf(stderr, "status: %s\n", st.ok() ? "ok" : status_str(st).c_str());
  }

  // ---- Judge (judge.hpp, as every row target).
  judge_rows(st, global, rx, loss, grad, V, V, c.want_grad, c.fused, c.threads);
}

inline cfg decode(input& in) {
  cfg c;
  c.lists = in.bit();
  c.N = 1 + in.pick(8);
  c.V = 1 + in.pick(64);
  c.K = 1 + in.pick(8);
  static const ety pairs[][2] = {{ety::f32, ety::f32}, {ety::f64, ety::f64}, {ety::bf16, ety::bf16}, {ety::fp16, ety::fp16},
                                 {ety::bf16, ety::f32}, {ety::fp16, ety::f64}};
  const int pr = in.pick(6);
  c.ts = pairs[pr][0];
  c.tt = pairs[pr][1];
  const uint8_t flags = in.u8();
  c.want_grad = (flags & 3) != 0;
  c.grad_double = (flags & 4) != 0 && pr == 0;
  c.fused = (flags & 8) != 0;
  c.threads = 1 + ((flags >> 4) % 3);
  c.tail = in.pick(16) == 0 ? 3 : in.pick(3);
  static const int ks[] = {1, 2, 3, 4, 5, 8, 16, 64, 3, 2, 0, -1, 100, 1 << 20, INT_MAX, 7};
  c.k = in.from(ks);
  static const double temps[] = {1, 1, 1, 1, 0.5, 2, 0.05, 20, 0.7, 1e-30, 0, -1, std::numeric_limits<double>::quiet_NaN(), 1};
  c.Ts = in.from(temps);
  c.Tt = in.bit() ? c.Ts : in.from(temps);
  c.vs.neg_inf = in.bit();
  c.vs.specials = in.pick(4) == 0;
  c.vt.neg_inf = in.bit();
  c.vt.specials = in.pick(4) == 0;
  const double ms = c.ts == ety::fp16 ? 65504.0 : (c.ts == ety::f64 ? 1.7e308 : 3.3e38);
  const double mt = c.tt == ety::fp16 ? 65504.0 : (c.tt == ety::f64 ? 1.7e308 : 3.3e38);
  c.vs.scale = pick_scale(in, ms);
  c.vt.scale = in.bit() ? c.vs.scale : pick_scale(in, mt);
  c.vs.offset = pick_offset(in);
  c.vt.offset = in.bit() ? c.vs.offset : pick_offset(in);
  c.list_mode = in.pick(3) == 0 ? 1 : 0;
  static const double lscales[] = {1, 3, 0.3, 10, 30, 1000};
  c.list_scale = in.from(lscales);
  c.list_specials = in.pick(3) == 0;
  if (in.pick(4) == 0) {
    static const double gss[] = {1, 0.5, 0, -1, 1e-20, 1e20, std::numeric_limits<double>::quiet_NaN(), -dinf};
    for (int r = 0; r < c.N; ++r) c.gscale.push_back(in.from(gss));
  }
  return c;
}

inline result check(const uint8_t* data, size_t size) {
  input in(data, size);
  const cfg c = decode(in);
  const std::string ctx = c.describe();
  return guarded(
      [&] {
        using tropd::bf16;
        using tropd::fp16;
        if (c.lists) {
          switch (c.ts) {
            case ety::f32: run<float, void, float>(c, in); break;
            case ety::f64: run<double, void, float>(c, in); break;
            case ety::bf16: run<bf16, void, float>(c, in); break;
            case ety::fp16: run<fp16, void, float>(c, in); break;
          }
          return;
        }
        if (c.ts == ety::f32 && c.tt == ety::f32) {
          if (c.grad_double) run<float, float, double>(c, in); else run<float, float, float>(c, in);
        } else if (c.ts == ety::f64 && c.tt == ety::f64) run<double, double, float>(c, in);
        else if (c.ts == ety::bf16 && c.tt == ety::bf16) run<bf16, bf16, float>(c, in);
        else if (c.ts == ety::fp16 && c.tt == ety::fp16) run<fp16, fp16, float>(c, in);
        else if (c.ts == ety::bf16) run<bf16, float, float>(c, in);
        else run<fp16, double, float>(c, in);
      },
      &ctx);
}

}  // namespace tropd_fuzz::topk
