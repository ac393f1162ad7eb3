// tests/reference/naive.hpp: a deliberately naive long-double reference for tropd's
// divergence estimators, written from docs/method.md sections 1-2 alone (not from the
// library code).
//
// Everything is materialised: p and q are full probability vectors, every sum is a plain
// loop in long double, gradients are the closed forms of method.md (with respect to the
// student logits z, including the 1/T_S factor of the temperature), and a generic
// central finite-difference helper checks those closed forms. -inf logits mean zero mass.
//
// Nothing here includes a tropd header: the only shared vocabulary is plain numbers.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace tropd_test::naive {

using ld = long double;
using vec = std::vector<ld>;

inline constexpr ld inf = std::numeric_limits<ld>::infinity();

// ---------------------------------------------------------------------------
// 16-bit storage decoders (IEEE binary16 and bfloat16), from the formats' definitions.
// ---------------------------------------------------------------------------

/// Value of a bfloat16 bit pattern: the top 16 bits of an IEEE binary32.
inline ld decode_bf16(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// Value of an IEEE binary16 bit pattern (1 sign, 5 exponent bits with bias 15, 10 mantissa bits).
inline ld decode_fp16(uint16_t bits) {
  const int sign = (bits >> 15) & 1;
  const int e = (bits >> 10) & 0x1f;
  const int m = bits & 0x3ff;
  ld v;
  if (e == 0)
    v = std::ldexp(static_cast<ld>(m), -24);  // subnormal: m * 2^-24
  else if (e == 31)
    v = m ? std::numeric_limits<ld>::quiet_NaN() : inf;
  else
    v = std::ldexp(static_cast<ld>(1024 + m), e - 25);  // (1 + m/1024) * 2^(e-15)
  return sign ? -v : v;
}

// ---------------------------------------------------------------------------
// Distributions.
// ---------------------------------------------------------------------------

/// log_softmax(z / T): l_v = z_v/T - log sum_w exp(z_w/T). -inf entries stay -inf.
/// Requires at least one finite entry.
inline vec log_softmax(const vec& z, ld T = 1) {
  vec a(z.size());
  ld mx = -inf;
  for (size_t i = 0; i < z.size(); ++i) {
    a[i] = z[i] / T;
    mx = std::max(mx, a[i]);
  }
  ld s = 0;
  for (ld x : a)
    if (x != -inf) s += std::exp(x - mx);
  const ld lse = mx + std::log(s);
  vec l(z.size());
  for (size_t i = 0; i < z.size(); ++i) l[i] = (a[i] == -inf) ? -inf : a[i] - lse;
  return l;
}

/// exp of a log-probability vector.
inline vec probs(const vec& l) {
  vec p(l.size());
  for (size_t i = 0; i < l.size(); ++i) p[i] = (l[i] == -inf) ? ld(0) : std::exp(l[i]);
  return p;
}

/// log(e^x + e^y), with -inf as the identity.
inline ld logaddexp(ld x, ld y) {
  if (x == -inf) return y;
  if (y == -inf) return x;
  const ld m = std::max(x, y);
  return m + std::log(std::exp(x - m) + std::exp(y - m));
}

/// log sum_i e^{x_i} over a vector (-inf for an empty / all -inf vector).
inline ld logsumexp(const vec& x) {
  ld m = -inf;
  for (ld v : x) m = std::max(m, v);
  if (m == -inf) return -inf;
  ld s = 0;
  for (ld v : x)
    if (v != -inf) s += std::exp(v - m);
  return m + std::log(s);
}

/// Shannon entropy -sum p log p of a distribution given as log-probabilities.
inline ld entropy(const vec& l) {
  ld h = 0;
  for (ld x : l)
    if (x != -inf) h -= std::exp(x) * x;
  return h;
}

/// A value and the gradient with respect to the student logits z.
struct value_grad {
  ld value = 0;
  vec grad;
};

// ---------------------------------------------------------------------------
// Full-vocabulary divergences (method.md 2.2). z: student logits, u: teacher logits.
// ---------------------------------------------------------------------------

/// KL(p || q) = sum_v p_v (ls_v - lt_v); +inf when some p_v > 0 = q_v.
/// Gradient p * (d - KL) / T_S with d = ls - lt (0 where p_v = 0).
inline value_grad reverse_kl(const vec& z, const vec& u, ld Ts = 1, ld Tt = 1) {
  const vec ls = log_softmax(z, Ts), lt = log_softmax(u, Tt);
  const vec p = probs(ls);
  value_grad r;
  r.grad.assign(z.size(), 0);
  for (size_t v = 0; v < z.size(); ++v) {
    if (p[v] == 0) continue;
    if (lt[v] == -inf) {
      r.value = inf;
      return r;
    }
    r.value += p[v] * (ls[v] - lt[v]);
  }
  for (size_t v = 0; v < z.size(); ++v)
    if (p[v] > 0) r.grad[v] = p[v] * ((ls[v] - lt[v]) - r.value) / Ts;
  return r;
}

/// KL(q || p) = sum_v q_v (lt_v - ls_v); +inf when some q_v > 0 = p_v. Gradient (p - q) / T_S.
inline value_grad forward_kl(const vec& z, const vec& u, ld Ts = 1, ld Tt = 1) {
  const vec ls = log_softmax(z, Ts), lt = log_softmax(u, Tt);
  const vec p = probs(ls), q = probs(lt);
  value_grad r;
  r.grad.assign(z.size(), 0);
  for (size_t v = 0; v < z.size(); ++v) {
    if (q[v] == 0) continue;
    if (ls[v] == -inf) {
      r.value = inf;
      return r;
    }
    r.value += q[v] * (lt[v] - ls[v]);
  }
  for (size_t v = 0; v < z.size(); ++v) r.grad[v] = (p[v] - q[v]) / Ts;
  return r;
}

/// Generalised JSD: m = beta q + (1 - beta) p, JSD = beta KL(q||m) + (1 - beta) KL(p||m);
/// beta = 0 is forward KL, beta = 1 reverse KL. log m by log-sum-exp of lt + log beta and
/// ls + log(1 - beta). Gradient (1 - beta) p (g - <g>_p) / T_S with g = ls - log m.
inline value_grad jsd(const vec& z, const vec& u, ld beta, ld Ts = 1, ld Tt = 1) {
  if (beta == 0) return forward_kl(z, u, Ts, Tt);
  if (beta == 1) return reverse_kl(z, u, Ts, Tt);
  const vec ls = log_softmax(z, Ts), lt = log_softmax(u, Tt);
  const vec p = probs(ls), q = probs(lt);
  const size_t V = z.size();
  vec lm(V), g(V, 0);
  for (size_t v = 0; v < V; ++v) lm[v] = logaddexp(lt[v] + std::log(beta), ls[v] + std::log1p(-beta));
  ld kl_qm = 0, kl_pm = 0, mean_g = 0;
  for (size_t v = 0; v < V; ++v) {
    if (q[v] > 0) kl_qm += q[v] * (lt[v] - lm[v]);
    if (p[v] > 0) {
      g[v] = ls[v] - lm[v];
      kl_pm += p[v] * g[v];
      mean_g += p[v] * g[v];
    }
  }
  value_grad r;
  r.value = beta * kl_qm + (1 - beta) * kl_pm;
  r.grad.assign(V, 0);
  for (size_t v = 0; v < V; ++v)
    if (p[v] > 0) r.grad[v] = (1 - beta) * p[v] * (g[v] - mean_g) / Ts;
  return r;
}

/// Total variation 0.5 sum |p - q|; gradient 0.5 p (sgn(p - q) - sum_w p_w sgn(p_w - q_w)) / T_S.
inline value_grad total_variation(const vec& z, const vec& u, ld Ts = 1, ld Tt = 1) {
  const vec p = probs(log_softmax(z, Ts)), q = probs(log_softmax(u, Tt));
  const size_t V = z.size();
  auto sgn = [](ld x) { return x > 0 ? ld(1) : (x < 0 ? ld(-1) : ld(0)); };
  value_grad r;
  ld mean_sgn = 0;
  for (size_t v = 0; v < V; ++v) {
    r.value += 0.5L * std::fabs(p[v] - q[v]);
    mean_sgn += p[v] * sgn(p[v] - q[v]);
  }
  r.grad.assign(V, 0);
  for (size_t v = 0; v < V; ++v) r.grad[v] = 0.5L * p[v] * (sgn(p[v] - q[v]) - mean_sgn) / Ts;
  return r;
}

// ---------------------------------------------------------------------------
// Teacher top-k forward KL (method.md 2.3).
// ---------------------------------------------------------------------------

enum class tail { raw, renormalised, tail_bucket };

/// The ids of the k largest entries of x (ties: lower id first), strongest first.
/// Entries equal to -inf are never selected (they carry no mass), so fewer than k ids
/// may come back.
inline std::vector<int> topk_ids(const vec& x, int k) {
  std::vector<int> ids(x.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) { return x[a] > x[b]; });
  std::vector<int> out;
  for (int id : ids) {
    if (static_cast<int>(out.size()) == k) break;
    if (x[id] == -inf) break;
    out.push_back(id);
  }
  return out;
}

/// Top-k forward KL of student logits z against a teacher list (ids, teacher log-probs lq;
/// entries with lq = -inf are padding and ignored). The student log-probabilities are full
/// vocabulary ones, ls = log_softmax(z / T_S), gathered at the ids.
///   raw:          sum_K q (log q - ls)
///   renormalised: sum_K qk (log qk - ls), qk = q / S_K
///   tail_bucket:  raw + (1 - S_K) (log(1 - S_K) - log(1 - P_K))
/// The gradient is derived by the chain rule: with the sparse coefficients c_v = dL/dls_v and,
/// for the tail bucket, c_tail = dL/dP_K,
///   dL/da_j = sum_{v in K} c_v (delta_vj - p_j) + c_tail * (p_j [j in K] - P_K p_j),
/// then divided by T_S. Returns value +inf when the divergence is infinite.
inline value_grad topk_forward_kl(const vec& z, const std::vector<int>& ids, const vec& lq, tail t, ld Ts = 1) {
  const vec ls = log_softmax(z, Ts);
  const vec p = probs(ls);
  const size_t V = z.size();
  ld SK = 0, PK = 0;
  std::vector<char> inK(V, 0);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (lq[i] == -inf) continue;
    SK += std::exp(lq[i]);
    PK += p[static_cast<size_t>(ids[i])];
    inK[static_cast<size_t>(ids[i])] = 1;
  }
  value_grad r;
  r.grad.assign(V, 0);
  vec c(ids.size(), 0);
  ld c_tail = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (lq[i] == -inf) continue;
    const ld lsv = ls[static_cast<size_t>(ids[i])];
    if (lsv == -inf) {
      r.value = inf;
      return r;
    }
    if (t == tail::renormalised) {
      const ld lqk = lq[i] - std::log(SK);
      r.value += std::exp(lqk) * (lqk - lsv);
      c[i] = -std::exp(lqk);
    } else {
      r.value += std::exp(lq[i]) * (lq[i] - lsv);
      c[i] = -std::exp(lq[i]);
    }
  }
  if (t == tail::tail_bucket && SK < 1) {
    if (!(PK < 1)) {
      r.value = inf;
      return r;
    }
    r.value += (1 - SK) * (std::log(1 - SK) - std::log1p(-PK));
    c_tail = (1 - SK) / (1 - PK);  // d/dP_K of -(1 - S_K) log(1 - P_K)
  }
  ld csum = 0;
  for (ld x : c) csum += x;
  for (size_t j = 0; j < V; ++j) r.grad[j] = -p[j] * csum + c_tail * (inK[j] ? p[j] - PK * p[j] : -PK * p[j]);
  for (size_t i = 0; i < ids.size(); ++i)
    if (lq[i] != -inf) r.grad[static_cast<size_t>(ids[i])] += c[i];
  for (ld& g : r.grad) g /= Ts;
  return r;
}

// ---------------------------------------------------------------------------
// Sampled-token estimators (method.md 2.1). s = log p_S(y), t = log p_T(y).
// ---------------------------------------------------------------------------

enum class est { k1, k2, k3 };
enum class usage { pg_reward, loss };

/// k1 = -log r = s - t, k2 = 0.5 (log r)^2, k3 = (r - 1) - log r with r = exp(t - s).
inline ld k_value(est e, ld s, ld t) {
  const ld log_r = t - s;
  switch (e) {
    case est::k1: return -log_r;
    case est::k2: return 0.5L * log_r * log_r;
    case est::k3: return std::expm1(log_r) - log_r;
  }
  return 0;
}

/// d k / d s (with t fixed): k1 -> 1, k2 -> s - t, k3 -> 1 - r.
inline ld k_dvalue_ds(est e, ld s, ld t) {
  switch (e) {
    case est::k1: return 1;
    case est::k2: return s - t;
    case est::k3: return -std::expm1(t - s);  // 1 - r, without cancellation near r = 1
  }
  return 0;
}

struct sampled_value {
  ld loss = 0;       ///< L
  ld dloss_ds = 0;   ///< dL/ds
  ld advantage = 0;  ///< A (PG usage); -k(s, t) for loss usage
  ld estimate = 0;   ///< k(s, t)
};

/// PG reward: A = -k(s_old, t) (detached), rho = exp(s - s_old), L = -rho A, dL/ds = -rho A.
/// Loss:      L = k(s, t), dL/ds = k'(s, t).
inline sampled_value sampled(est e, usage u, ld s, ld s_old, ld t) {
  sampled_value r;
  r.estimate = k_value(e, s, t);
  if (u == usage::pg_reward) {
    r.advantage = -k_value(e, s_old, t);
    const ld rho = std::exp(s - s_old);
    r.loss = -rho * r.advantage;
    r.dloss_ds = -rho * r.advantage;
  } else {
    r.loss = k_value(e, s, t);
    r.dloss_ds = k_dvalue_ds(e, s, t);
    r.advantage = -r.loss;
  }
  return r;
}

/// Logit gradient of a sampled estimator: dL/ds * (e_y - p) / T_S.
inline vec sampled_logit_grad(ld dloss_ds, int y, const vec& z, ld Ts = 1) {
  const vec p = probs(log_softmax(z, Ts));
  vec g(z.size());
  for (size_t j = 0; j < z.size(); ++j) g[j] = dloss_ds * ((static_cast<int>(j) == y ? 1 : 0) - p[j]) / Ts;
  return g;
}

// ---------------------------------------------------------------------------
// Finite differences.
// ---------------------------------------------------------------------------

/// Central finite-difference gradient of a scalar function of a logits vector, in long
/// double: h_i = rel * max(1, |z_i|). -inf entries are left alone (gradient 0 there).
inline vec fd_grad(const std::function<ld(const vec&)>& f, const vec& z, ld rel = 1e-5L) {
  vec g(z.size(), 0);
  vec x = z;
  for (size_t i = 0; i < z.size(); ++i) {
    if (z[i] == -inf) continue;
    const ld h = rel * std::max<ld>(1, std::fabs(z[i]));
    x[i] = z[i] + h;
    const ld fp = f(x);
    x[i] = z[i] - h;
    const ld fm = f(x);
    x[i] = z[i];
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

}  // namespace tropd_test::naive
