// benchmarks/naive_rows.hpp: the multi-pass baseline the CPU benchmarks compare against.
//
// Written the way a tensor framework evaluates these losses in eager mode: every step is a
// separate pass over the whole [N x V] batch and every intermediate is materialised
// (fp32 copies of bf16 inputs, log_softmax of both rows, probabilities, the log-ratio),
// then the loss and the gradient are further passes. Each pass is vectorised (Eigen) and
// split over rows with the same thread count as the tropd run, so the comparison isolates
// the cost of the extra passes and memory traffic. The per-token decisions of the row-level
// objectives reuse tropd's token-level entry point (that part is O(N K), not O(N V)).
// Benchmark-only; not part of the library.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include <Eigen/Core>
#include <tropd/tropd.hpp>

#include "bench_support.hpp"

namespace tropd_bench::naive {

using Arr = Eigen::Map<Eigen::ArrayXf>;
using CArr = Eigen::Map<const Eigen::ArrayXf>;

/// Materialised intermediates, reused between calls (a framework's caching allocator).
struct workspace {
  std::vector<buffer<float>> big;  // [N x V] arrays
  std::vector<std::vector<float>> small;
  float* arr(size_t i, size_t n) {
    if (big.size() <= i) big.resize(i + 1);
    if (big[i].size() != n) big[i] = buffer<float>(n);
    return big[i].data();
  }
  float* vec(size_t i, size_t n) {
    if (small.size() <= i) small.resize(i + 1);
    small[i].resize(n);
    return small[i].data();
  }
};

struct ctx {
  index_t N, V;
  int threads;
  workspace& ws;
  CArr row(const float* x, index_t r) const { return CArr(x + r * V, V); }
  Arr row(float* x, index_t r) const { return Arr(x + r * V, V); }
};

/// Pass: fp32 copy of a bf16 tensor (what `.float()` does).
inline void upcast(const ctx& c, const tropd::bf16* x, float* out) {
  par_rows(c.N, c.threads, [&](index_t b, index_t e) {
    for (index_t i = b * c.V; i < e * c.V; ++i) out[i] = x[i].to_float();
  });
}

/// log_softmax the way a framework's kernel does it: a max pass, a sum-exp pass and a pass
/// that writes the [N x V] result.
inline void log_softmax(const ctx& c, const float* x, float* out, float* mx, float* lse) {
  par_rows(c.N, c.threads, [&](index_t b, index_t e) {
    for (index_t r = b; r < e; ++r) mx[r] = c.row(x, r).maxCoeff();
  });
  par_rows(c.N, c.threads, [&](index_t b, index_t e) {
    for (index_t r = b; r < e; ++r) lse[r] = mx[r] + std::log((c.row(x, r) - mx[r]).exp().sum());
  });
  par_rows(c.N, c.threads, [&](index_t b, index_t e) {
    for (index_t r = b; r < e; ++r) c.row(out, r) = c.row(x, r) - lse[r];
  });
}

/// Pass: probabilities p = exp(log p), materialised.
inline void probs(const ctx& c, const float* lp, float* out) {
  par_rows(c.N, c.threads, [&](index_t b, index_t e) {
    for (index_t r = b; r < e; ++r) c.row(out, r) = c.row(lp, r).exp();
  });
}

/// log_softmax + probabilities of one logit tensor: returns LS (slot i) and P (slot i+1).
inline void softmax_both(const ctx& c, const float* x, size_t slot, float*& L, float*& P) {
  const size_t nv = size_t(c.N * c.V);
  L = c.ws.arr(slot, nv);
  P = c.ws.arr(slot + 1, nv);
  float* mx = c.ws.vec(slot, size_t(c.N));
  float* lse = c.ws.vec(slot + 1, size_t(c.N));
  log_softmax(c, x, L, mx, lse);
  probs(c, L, P);
}

enum class div_kind { rkl, fkl, jsd, tv };

/// Full-vocabulary divergence and its logit gradient (T = 1), multi-pass.
inline void divergence(const ctx& c, div_kind kind, double beta, const float* S, const float* T, double* loss,
                       float* G) {
  float *LS, *P, *LT, *Q;
  softmax_both(c, S, 0, LS, P);
  softmax_both(c, T, 2, LT, Q);
  const size_t nv = size_t(c.N * c.V);
  float* D = c.ws.arr(4, nv);
  float* v = c.ws.vec(4, size_t(c.N));
  switch (kind) {
    case div_kind::rkl:
      // Pass: log-ratio; pass: KL; pass: gradient p (d - KL).
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) c.row(D, r) = c.row(LS, r) - c.row(LT, r);
      });
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) v[r] = (c.row(P, r) * c.row(D, r)).sum();
      });
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) c.row(G, r) = c.row(P, r) * (c.row(D, r) - v[r]);
      });
      break;
    case div_kind::fkl:
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) c.row(D, r) = c.row(LT, r) - c.row(LS, r);
      });
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) v[r] = (c.row(Q, r) * c.row(D, r)).sum();
      });
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) c.row(G, r) = c.row(P, r) - c.row(Q, r);
      });
      break;
    case div_kind::jsd: {
      // Pass: log m = logaddexp(lt + log beta, ls + log(1 - beta)); passes: both KLs; gradient.
      const float lb = float(std::log(beta)), l1b = float(std::log1p(-beta));
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) {
          auto x = c.row(LT, r) + lb;
          auto y = c.row(LS, r) + l1b;
          c.row(D, r) = x.max(y) + ((x.min(y) - x.max(y)).exp() + 1.0f).log();
        }
      });
      float* v1 = c.ws.vec(5, size_t(c.N));
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) {
          v[r] = (c.row(Q, r) * (c.row(LT, r) - c.row(D, r))).sum();
          v1[r] = (c.row(P, r) * (c.row(LS, r) - c.row(D, r))).sum();
        }
      });
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r)
          c.row(G, r) = float(1 - beta) * c.row(P, r) * ((c.row(LS, r) - c.row(D, r)) - v1[r]);
      });
      for (index_t r = 0; r < c.N; ++r) v[r] = float(beta * v[r] + (1 - beta) * v1[r]);
      break;
    }
    case div_kind::tv: {
      float* v1 = c.ws.vec(5, size_t(c.N));
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) c.row(D, r) = c.row(P, r) - c.row(Q, r);
      });
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) {
          v[r] = 0.5f * c.row(D, r).abs().sum();
          v1[r] = (c.row(D, r) > 0).select(c.row(P, r), (c.row(D, r) < 0).select(-c.row(P, r), 0.0f)).sum();
        }
      });
      par_rows(c.N, c.threads, [&](index_t b, index_t e) {
        for (index_t r = b; r < e; ++r) {
          auto sg = (c.row(D, r) > 0).select(Eigen::ArrayXf::Ones(c.V), (c.row(D, r) < 0).select(-Eigen::ArrayXf::Ones(c.V), 0.0f));
          c.row(G, r) = 0.5f * c.row(P, r) * (sg - v1[r]);
        }
      });
      break;
    }
  }
  for (index_t r = 0; r < c.N; ++r) loss[r] = v[r];
}

/// Gradient pass of a sparse row term: G = sum_i coef_i e_{id_i} - (sum_i coef_i) p.
inline void sparse_grad(const ctx& c, const float* P, const int32_t* ids, const double* coef, int m, float* G) {
  par_rows(c.N, c.threads, [&](index_t b, index_t e) {
    for (index_t r = b; r < e; ++r) {
      double gs = 0;
      for (int i = 0; i < m; ++i) gs += coef[r * m + i];
      c.row(G, r) = -float(gs) * c.row(P, r);
      for (int i = 0; i < m; ++i) G[r * c.V + ids[r * m + i]] += float(coef[r * m + i]);
    }
  });
}

/// torch.topk-style selection per row of a materialised tensor (descending, ties: lower id).
inline void topk(const ctx& c, const float* X, int K, int32_t* ids, float* vals) {
  par_rows(c.N, c.threads, [&](index_t b, index_t e) {
    std::vector<int32_t> idx(static_cast<size_t>(c.V));
    for (index_t r = b; r < e; ++r) {
      const float* x = X + r * c.V;
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + K, idx.end(),
                        [&](int32_t i, int32_t j) { return x[i] > x[j] || (x[i] == x[j] && i < j); });
      for (int k = 0; k < K; ++k) {
        ids[r * K + k] = idx[size_t(k)];
        vals[r * K + k] = x[idx[size_t(k)]];
      }
    }
  });
}

/// Teacher top-k forward KL from full teacher logits.
inline void topk_fkl_logits(const ctx& c, const tropd::estimators::topk_forward_kl& est, const float* S, const float* T,
                            double* loss, float* G) {
  float *LS, *P, *LT, *Q;
  softmax_both(c, S, 0, LS, P);
  softmax_both(c, T, 2, LT, Q);
  const int K = est.k;
  std::vector<int32_t> ids(static_cast<size_t>(c.N * K));
  std::vector<float> lq(static_cast<size_t>(c.N * K)), ls(static_cast<size_t>(c.N * K));
  std::vector<double> g(static_cast<size_t>(c.N * K));
  topk(c, LT, K, ids.data(), lq.data());
  for (index_t r = 0; r < c.N; ++r) {
    for (int k = 0; k < K; ++k) ls[size_t(r * K + k)] = LS[r * c.V + ids[size_t(r * K + k)]];
    loss[r] = est.eval(lq.data() + r * K, ls.data() + r * K, K, g.data() + r * K).value;
  }
  sparse_grad(c, P, ids.data(), g.data(), K, G);
}

/// Teacher top-k forward KL from given lists.
inline void topk_fkl_lists(const ctx& c, const tropd::estimators::topk_forward_kl& est, const float* S, const int32_t* tid,
                           const float* tlp, int K, double* loss, float* G) {
  float *LS, *P;
  softmax_both(c, S, 0, LS, P);
  std::vector<float> ls(static_cast<size_t>(c.N * K));
  std::vector<double> g(static_cast<size_t>(c.N * K));
  for (index_t r = 0; r < c.N; ++r) {
    for (int k = 0; k < K; ++k) ls[size_t(r * K + k)] = LS[r * c.V + tid[r * K + k]];
    loss[r] = est.eval(tlp + r * K, ls.data() + r * K, K, g.data() + r * K).value;
  }
  sparse_grad(c, P, tid, g.data(), K, G);
}

/// Sampled-token estimator with full teacher logits.
template <class Est>
void sampled(const ctx& c, const Est& est, const float* S, const float* T, const int32_t* ids, double* loss, float* G) {
  float *LS, *P, *LT, *Q;
  softmax_both(c, S, 0, LS, P);
  softmax_both(c, T, 2, LT, Q);
  std::vector<double> coef(static_cast<size_t>(c.N));
  for (index_t r = 0; r < c.N; ++r) {
    const double s = LS[r * c.V + ids[r]], t = LT[r * c.V + ids[r]];
    const auto v = est(s, s, t);
    loss[r] = v.loss;
    coef[size_t(r)] = v.dloss_ds;
  }
  sparse_grad(c, P, ids, coef.data(), 1, G);
}

/// Row-level objective: log_softmax and probabilities of both rows, entropies and the reverse
/// KL per row (extra passes), teacher top-k (torch.topk) where the outlier handler needs it,
/// then tropd's token-level rule for the decisions, then the dense gradient pass.
template <class Obj>
double objective_rows(const ctx& c, const Obj& obj, const float* S, const float* T, const tropd::host::row_inputs& tok,
                      const tropd::host::eval_options& opt, float* G) {
  using namespace tropd;
  float *LS, *P, *LT, *Q;
  softmax_both(c, S, 0, LS, P);
  softmax_both(c, T, 2, LT, Q);
  const index_t N = c.N, V = c.V;
  std::vector<float> s(static_cast<size_t>(N)), t(static_cast<size_t>(N)), hs(static_cast<size_t>(N)), ht(static_cast<size_t>(N)), rk(static_cast<size_t>(N));
  par_rows(N, c.threads, [&](index_t b, index_t e) {  // entropy and reverse-KL passes
    for (index_t r = b; r < e; ++r) {
      hs[size_t(r)] = -(c.row(P, r) * c.row(LS, r)).sum();
      ht[size_t(r)] = -(c.row(Q, r) * c.row(LT, r)).sum();
      rk[size_t(r)] = (c.row(P, r) * (c.row(LS, r) - c.row(LT, r))).sum();
    }
  });
  for (index_t r = 0; r < N; ++r) {
    s[size_t(r)] = LS[r * V + tok.ids[r]];
    t[size_t(r)] = LT[r * V + tok.ids[r]];
  }
  tropd::token_batch b;
  b.s = {s.data(), N};
  b.t = {t.data(), N};
  b.from = tok.from;
  b.seq_offsets = tok.seq_offsets;
  b.student_entropy = {hs.data(), N};
  b.teacher_entropy = {ht.data(), N};
  b.rkl = {rk.data(), N};
  constexpr bool need_topk = Obj::outlier_type::needs_topk;
  index_t K = 0;
  if constexpr (need_topk) K = obj.outlier.fkl.k;
  std::vector<int32_t> kid(static_cast<size_t>(N * K));
  std::vector<float> klq(static_cast<size_t>(N * K)), kls(static_cast<size_t>(N * K)), dtopk(static_cast<size_t>(N * K));
  if constexpr (need_topk) {
    topk(c, LT, int(K), kid.data(), klq.data());
    for (index_t i = 0; i < N * K; ++i) kls[size_t(i)] = LS[(i / K) * V + kid[size_t(i)]];
    b.topk_ids = make_matrix<const int32_t>(kid.data(), N, K);
    b.topk_teacher = make_matrix<const float>(klq.data(), N, K);
    b.topk_student = make_matrix<const float>(kls.data(), N, K);
  }
  std::vector<float> dds(static_cast<size_t>(N));
  double L = 0;
  std::vector<double> coef(size_t(N * (K + 1)));
  std::vector<int32_t> cid(size_t(N * (K + 1)));
  if constexpr (Obj::has_dense) {
    // GKD: every non-prompt token carries the dense JSD term, token-mean.
    std::vector<double> v(static_cast<size_t>(N));
    divergence(c, div_kind::jsd, obj.dense.beta, S, T, v.data(), G);
    double n = 0;
    for (index_t r = 0; r < N; ++r) n += tok.from[r] != origin::prompt;
    par_rows(N, c.threads, [&](index_t b0, index_t e0) {
      for (index_t r = b0; r < e0; ++r) c.row(G, r) *= float(obj.dense_weight / n);
    });
    for (index_t r = 0; r < N; ++r) L += obj.dense_weight * v[size_t(r)] / n;
    return L;
  } else {
    tropd::token_outputs out;
    out.dloss_ds = {dds.data(), N};
    if (K) out.dloss_dtopk = make_matrix<float>(dtopk.data(), N, K);
    out.loss = &L;
    throw_if_error(host::evaluate_tokens(obj, b, out, opt));
    for (index_t r = 0; r < N; ++r) {
      cid[size_t(r * (K + 1))] = tok.ids[r];
      coef[size_t(r * (K + 1))] = dds[size_t(r)];
      for (index_t k = 0; k < K; ++k) {
        cid[size_t(r * (K + 1) + 1 + k)] = kid[size_t(r * K + k)];
        coef[size_t(r * (K + 1) + 1 + k)] = dtopk[size_t(r * K + k)];
      }
    }
    sparse_grad(c, P, cid.data(), coef.data(), int(K + 1), G);
    return L;
  }
}

}  // namespace tropd_bench::naive
