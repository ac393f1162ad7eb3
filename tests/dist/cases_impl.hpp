// tests/dist/cases_impl.hpp: the implementation of tests/dist/cases.hpp's cases (every preset
// through the sharded split call, compared with host::evaluate_rows on the whole batch),
// included by the cases_*.cpp files that instantiate them (split so that they build in
// parallel). Test-only.
#pragma once

#include "dist/cases.hpp"

#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <sstream>

#include "dist/problem.hpp"

namespace tropd_dist_test {

namespace cases_detail {

namespace host = tropd::host;
namespace dist = tropd::dist;
namespace presets = tropd::presets;
using tropd::diagnostics;
using tropd::errc;
using tropd::make_matrix;
using tropd::status;
using tropd::view_of;

/// TRM-style sequence mask on the log-ratio (its batch decision needs whole sequences).
using seq_bound_objective = tropd::objective<tropd::regions::sequence_ratio_bound, tropd::estimators::k1_reward,
                                             tropd::outliers::drop, tropd::clippers::pg_clip>;

/// The objective's top-k width set to K (served lists are K wide).
template <class Obj>
Obj with_k(Obj o, index_t K) {
  if constexpr (requires { o.outlier.fkl.k; }) o.outlier.fkl.k = int(K);
  return o;
}

template <class T>
std::vector<T> convert(const std::vector<float>& x) {
  return std::vector<T>(x.begin(), x.end());
}

struct outputs {
  status st{};
  double loss = 0;
  diagnostics diag{};
  std::vector<double> grad, dlds, adv, dtopk;
  std::vector<uint8_t> flags;
  std::vector<int32_t> topk_ids;

  void size(index_t n, index_t cols, index_t K) {
    grad.assign(size_t(n * cols), 777.0);
    dlds.assign(size_t(n), 777.0);
    adv.assign(size_t(n), 777.0);
    dtopk.assign(size_t(n * K), 777.0);
    flags.assign(size_t(n), 0xff);
    topk_ids.assign(size_t(n * K), 777);
  }
  host::row_outputs<double> view(index_t n, index_t cols, index_t K) {
    host::row_outputs<double> o;
    o.grad = make_matrix(grad.data(), n, cols);
    o.loss = &loss;
    o.diag = &diag;
    o.dloss_ds = tropd::values_out(dlds.data(), n);
    o.advantage = tropd::values_out(adv.data(), n);
    if (K > 0) {
      o.dloss_dtopk = tropd::values_matrix_out(dtopk.data(), n, K, K);
      o.topk_ids = make_matrix(topk_ids.data(), n, K);
    }
    o.flags = tropd::make_vector(flags.data(), n);
    return o;
  }
};

inline std::string num(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.9g", x);
  return b;
}

inline bool close(double a, double b, double rel, double abs_tol) {
  if (a == b) return true;  // equal infinities too
  if (std::isnan(a) && std::isnan(b)) return true;
  return std::fabs(a - b) <= rel * std::fabs(b) + abs_tol;
}

template <class Obj, class T, bool Served>
class run_impl final : public case_run {
  using teacher_t = std::conditional_t<Served, host::teacher_logprobs, tropd::matrix_view<const T>>;

 public:
  run_impl(const case_spec& spec, const Obj& obj, host::eval_options opt) : spec_(spec), obj_(obj), opt_(opt) {
    p_ = make_problem(spec.V, spec.seed);
    if (spec.mask_nan || spec.reject_nan) p_.z[size_t(4 * p_.V + p_.V - 2)] = NAN;
    opt_.threads = spec.threads;
    if (spec.mask_nan) opt_.bad_input = host::input_policy::mask;
    z_ = convert<T>(p_.z);
    u_ = convert<T>(p_.u);
    K_ = 0;
    if constexpr (requires { obj_.outlier.fkl.k; }) K_ = Served ? p_.K_lists : std::min<index_t>(obj_.outlier.fkl.k, p_.V);
    reference();
    shard();
  }

  bool next(dist::exchange& ex) override {
    if (!call_->next(ex)) {
      st_ = call_->result();
      return false;
    }
    return true;
  }
  int status_code() const override { return int(st_.code); }
  std::string status_message() const override { return st_.message(); }
  double loss() const override { return mine_.loss; }
  std::vector<size_t> tensor_bytes() const override { return call_->tensor_exchange_bytes(); }

  int compare(double loss_sum, std::string& log) const override {
    int bad = 0;
    std::ostringstream os;
    auto fail = [&](const std::string& what) {
      if (bad < 12) os << "  " << what << "\n";
      ++bad;
    };
    if (st_.code != ref_.st.code) {
      fail("status " + st_.message() + " vs single-process " + ref_.st.message());
      log += os.str();
      return bad;
    }
    if (!ref_.st.ok()) {
      if (st_.row != ref_.st.row) fail("error row " + std::to_string(st_.row) + " vs " + std::to_string(ref_.st.row));
      log += os.str();
      return bad;
    }
    const index_t n = sl_.n(), V = p_.V, W = sh_.width(), K = K_;
    if (spec_.per_rank) {
      // Per-rank normaliser: this rank's own count (token_mean: counted tokens).
      if (mine_.diag.normaliser != double(mine_.diag.n_counted) && obj_.agg.how == tropd::aggregation::mode::token_mean)
        fail("per-rank normaliser " + std::to_string(mine_.diag.normaliser) + " vs local count " + std::to_string(mine_.diag.n_counted));
      log += os.str();
      return bad;
    }
    // Tolerances: fp32 rounding of the row sums (the shards' sums are merged in another
    // order than one process's chunks). Values are weighted by w ~ 1 / normaliser. vOPD's
    // advantage R + KL_t reads a KL that fp32 sums give to ~1e-5 nats (a difference of sums of
    // O(10)-nat terms, in both runs). Gradient entries are compared to the scale of the terms
    // that cancel in them (dL/ds (e_y - p) when p_y ~ 1 - 1e-7: a peaked student; the dense
    // term's p (g - <g>)). fp64 logits: the same bounds scaled by 1e-5.
    const double s = spec_.fp64 ? 1e-5 : 1.0;
    const double wbar = ref_.diag.normaliser > 0 ? 1.0 / ref_.diag.normaliser : 1.0;
    constexpr bool reads_rkl = Obj::trust_type::needs_rkl;
    const double adv_abs = s * (reads_rkl ? 1e-5 : 1e-7), tok_abs = adv_abs * wbar;
    double dense_scale = 0;
    if constexpr (Obj::has_dense) dense_scale = obj_.dense_weight * wbar;
    if (!close(loss_sum, ref_.loss, 1e-6, adv_abs)) fail("loss " + num(loss_sum) + " vs " + num(ref_.loss));
    if (mine_.diag.normaliser != ref_.diag.normaliser)
      fail("normaliser " + std::to_string(mine_.diag.normaliser) + " vs " + std::to_string(ref_.diag.normaliser));
    if (spec_.dp_size == 1) {
      const diagnostics &a = mine_.diag, &b = ref_.diag;
      if (a.n_student != b.n_student || a.n_trusted != b.n_trusted || a.n_outlier != b.n_outlier || a.n_kept != b.n_kept ||
          a.n_counted != b.n_counted || a.n_masked_input != b.n_masked_input || a.n_zero_teacher_mass != b.n_zero_teacher_mass)
        fail("diagnostic counts differ");
      const double d1[] = {a.loss_trust, a.loss_outlier, a.loss_guidance, a.loss_dense, a.trust_fraction, a.tv_estimate,
                           a.mean_student_entropy, a.mean_teacher_entropy, a.mean_topk_teacher_mass, a.mean_topk_student_mass,
                           a.mean_rkl, a.mean_R_trusted, a.mean_R_outlier, a.adv_clip_fraction, a.ratio_clip_fraction};
      const double d2[] = {b.loss_trust, b.loss_outlier, b.loss_guidance, b.loss_dense, b.trust_fraction, b.tv_estimate,
                           b.mean_student_entropy, b.mean_teacher_entropy, b.mean_topk_teacher_mass, b.mean_topk_student_mass,
                           b.mean_rkl, b.mean_R_trusted, b.mean_R_outlier, b.adv_clip_fraction, b.ratio_clip_fraction};
      for (size_t i = 0; i < std::size(d1); ++i)
        if (!close(d1[i], d2[i], 1e-6, 1e-5 * s)) fail("diagnostic " + std::to_string(i) + ": " + num(d1[i]) + " vs " + num(d2[i]));
    }
    for (index_t i = 0; i < n; ++i) {
      const index_t r = sl_.r0 + i;
      if (mine_.flags[size_t(i)] != ref_.flags[size_t(r)])
        fail("flags of row " + std::to_string(r) + ": " + std::to_string(mine_.flags[size_t(i)]) + " vs " + std::to_string(ref_.flags[size_t(r)]));
      if (!close(mine_.dlds[size_t(i)], ref_.dlds[size_t(r)], 1e-6, tok_abs)) fail("dL/ds of row " + std::to_string(r) + ": " + num(mine_.dlds[size_t(i)]) + " vs " + num(ref_.dlds[size_t(r)]));
      if (!close(mine_.adv[size_t(i)], ref_.adv[size_t(r)], 1e-6, adv_abs)) fail("advantage of row " + std::to_string(r));
      for (index_t k = 0; k < K; ++k) {
        if (mine_.topk_ids[size_t(i * K + k)] != ref_.topk_ids[size_t(r * K + k)]) fail("top-k id of row " + std::to_string(r));
        if (!close(mine_.dtopk[size_t(i * K + k)], ref_.dtopk[size_t(r * K + k)], 1e-6, tok_abs))
          fail("dL/dtopk of row " + std::to_string(r) + " entry " + std::to_string(k) + ": " + num(mine_.dtopk[size_t(i * K + k)]) +
               " vs " + num(ref_.dtopk[size_t(r * K + k)]));
      }
      double mx = 0, scale = std::fabs(ref_.dlds[size_t(r)]) + (ref_.flags[size_t(r)] & tropd::flags::counted ? dense_scale : 0.0);
      for (index_t j = 0; j < V; ++j) mx = std::max(mx, std::fabs(ref_.grad[size_t(r * V + j)]));
      for (index_t k = 0; k < K; ++k) scale += std::fabs(ref_.dtopk[size_t(r * K + k)]);
      const double tol = s * (1e-5 * mx + 2e-6 * scale) + (reads_rkl ? tok_abs : 0.0) + 1e-14;
      for (index_t j = 0; j < W; ++j) {
        const double g = mine_.grad[size_t(i * W + j)], gr = ref_.grad[size_t(r * V + sh_.v0 + j)];
        if (!(std::fabs(g - gr) <= tol)) {
          fail("dL/dz of row " + std::to_string(r) + " column " + std::to_string(sh_.v0 + j) + ": " + num(g) + " vs " +
               num(gr) + " (row max " + num(mx) + ")");
          break;
        }
      }
    }
    log += os.str();
    return bad;
  }

 private:
  case_spec spec_;
  Obj obj_;
  host::eval_options opt_;
  problem p_;
  std::vector<T> z_, u_;
  index_t K_ = 0;
  outputs ref_, mine_;
  row_slice sl_;
  dist::vocab_shard sh_;
  // This rank's inputs.
  std::vector<T> zl_, ul_;
  std::vector<int32_t> ids_, lids_;
  std::vector<tropd::origin> from_;
  std::vector<double> s_old_, ref_lp_, t_, llp_;
  std::unique_ptr<dist::rows_call<Obj, T, teacher_t, double>> call_;
  status st_{};

  host::row_inputs inputs(index_t r0, index_t r1, const std::vector<index_t>& off, const std::vector<uint64_t>& seq_ids) {
    const index_t n = r1 - r0;
    ids_.assign(p_.ids.begin() + r0, p_.ids.begin() + r1);
    from_.assign(p_.from.begin() + r0, p_.from.begin() + r1);
    s_old_.assign(p_.s_old.begin() + r0, p_.s_old.begin() + r1);
    ref_lp_.assign(p_.ref.begin() + r0, p_.ref.begin() + r1);
    t_.assign(p_.t.begin() + r0, p_.t.begin() + r1);
    lids_.assign(p_.list_ids.begin() + r0 * p_.K_lists, p_.list_ids.begin() + r1 * p_.K_lists);
    llp_.assign(p_.list_lp.begin() + r0 * p_.K_lists, p_.list_lp.begin() + r1 * p_.K_lists);
    host::row_inputs in;
    in.ids = view_of(ids_);
    in.from = view_of(from_);
    in.seq_offsets = {off.data(), index_t(off.size())};
    in.seq_ids = {seq_ids.data(), index_t(seq_ids.size())};
    if (spec_.with_s_old) in.s_old = tropd::values_view(s_old_.data(), n);
    in.ref = tropd::values_view(ref_lp_.data(), n);
    if (Served) in.teacher_topk = host::topk_lists{make_matrix<const int32_t>(lids_.data(), n, p_.K_lists),
                                                   tropd::values_matrix(llp_.data(), n, p_.K_lists, p_.K_lists)};
    return in;
  }

  void reference() {
    const index_t n = p_.n, V = p_.V;
    ref_.size(n, V, K_);
    const host::row_inputs in = inputs(0, n, p_.off, p_.seq_ids);
    const auto zs = make_matrix<const T>(z_.data(), n, V);
    if constexpr (Served)
      ref_.st = host::evaluate_rows(obj_, zs, host::teacher_logprobs{tropd::values_view(t_.data(), n)}, in, ref_.view(n, V, K_), opt_);
    else
      ref_.st = host::evaluate_rows(obj_, zs, make_matrix<const T>(u_.data(), n, V), in, ref_.view(n, V, K_), opt_);
  }

  void shard() {
    const index_t V = p_.V;
    if (spec_.odd_shards && spec_.tp_size > 1) {
      const index_t b[] = {0, 1, 41, 42};
      const int P = spec_.tp_size, t = spec_.tp_rank;
      sh_ = {b[t], t + 1 < P ? b[t + 1] : V, V};
    } else {
      sh_ = even_shard(V, spec_.tp_rank, spec_.tp_size);
    }
    const index_t S = p_.n_seq(), d = spec_.dp_rank, D = spec_.dp_size;
    sl_ = spec_.split == data_split::sequences ? slice_sequences(p_, S * d / D, S * (d + 1) / D) : slice_rows(p_, p_.n * d / D, p_.n * (d + 1) / D);
    const index_t n = sl_.n(), W = sh_.width();
    // A strided view of the rank's rows and columns of the whole batch.
    const auto zs = tropd::matrix_view<const T>{z_.data() + sl_.r0 * V + sh_.v0, n, W, V};
    const auto us = tropd::matrix_view<const T>{u_.data() + sl_.r0 * V + sh_.v0, n, W, V};
    mine_.size(n, W, K_);
    const host::row_inputs in = inputs(sl_.r0, sl_.r1, sl_.off, sl_.seq_ids);
    dist::shard_options so;
    so.shard = sh_;
    if (spec_.per_rank) so.data = {dist::scope::per_rank, dist::scope::per_rank};
    const dist::group_layout tp{spec_.tp_rank, spec_.tp_size}, dp{spec_.dp_rank, spec_.dp_size};
    if constexpr (Served)
      call_ = std::make_unique<dist::rows_call<Obj, T, teacher_t, double>>(
          obj_, zs, host::teacher_logprobs{tropd::values_view(t_.data(), n)}, in, mine_.view(n, W, K_), opt_, so, tp, dp);
    else
      call_ = std::make_unique<dist::rows_call<Obj, T, teacher_t, double>>(obj_, zs, us, in, mine_.view(n, W, K_), opt_, so, tp, dp);
  }
};

using factory = std::function<std::unique_ptr<case_run>(const case_spec&)>;

/// Variants a preset is instantiated for (each is a separate instantiation: keep them few).
enum variant : int { fp32 = 1, fp64 = 2, served = 4 };

template <int Variants, class Obj>
factory make(Obj obj, uint64_t step = 3) {
  return [obj, step](const case_spec& s) -> std::unique_ptr<case_run> {
    host::eval_options opt;
    opt.seed = 42;
    opt.step = step;
    if (s.served) {
      if constexpr ((Variants & served) != 0) return std::make_unique<run_impl<Obj, float, true>>(s, with_k(obj, 8), opt);
      return nullptr;
    }
    if (s.fp64) {
      if constexpr ((Variants & fp64) != 0) return std::make_unique<run_impl<Obj, double, false>>(s, obj, opt);
      return nullptr;
    }
    return std::make_unique<run_impl<Obj, float, false>>(s, obj, opt);
  };
}

void register_a(std::map<std::string, factory>& m);  // cases_a.cpp
void register_b(std::map<std::string, factory>& m);  // cases_b.cpp
void register_c(std::map<std::string, factory>& m);  // cases_c.cpp

}  // namespace cases_detail

}  // namespace tropd_dist_test
