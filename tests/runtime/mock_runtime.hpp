// tests/runtime/mock_runtime.hpp: mock student and teacher models for the step driver
// (tropd/runtime/driver.hpp), with next-token distributions known in closed form.
//
// A model is a `closed_form`: over a vocabulary of V ids, the logits at a position are
//
//   z_v(prev, pos) = theta[prev][v] + amp * sin(0.5 pos + 0.9 v)
//
// where `prev` is the previous token of the same sequence (the row "BOS" = V for the first
// token of a sequence, whose context is empty) and `pos` the token's position inside its
// sequence. Row i of a batch therefore predicts tokens[i] from (tokens[i-1], i - start of
// its sequence), exactly the convention of tropd/runtime/concepts.hpp. theta is a
// [(V+1) x V] table drawn from a seed; a test recomputes any row from `logit(prev, pos, v)`
// and the batch alone.
//
// mock_student<Logits, Logprobs> exposes (through trailing requires-clauses, so the concepts
// see exactly the members that are switched on):
//   sample                 always: ancestral sampling from softmax(z / temperature), one
//                          Philox draw per token keyed by (seed, position in the
//                          continuation), stopping after `end_token` (if >= 0)
//   logits + backward_logits       when Logits: dL/dz rows are accumulated into grad_theta
//                                  (grad_theta[prev][v] += dL/dz_i[v]) and the last matrix
//                                  is kept in `last_grad`
//   logprobs + backward_logprobs   when Logprobs: dL/ds_i is chained through log_softmax,
//                                  grad_theta[prev][v] += dL/ds_i (e_y - p)_v, and the last
//                                  vector is kept in `last_dlds`
// Every call is counted, and the batch a backward call received is recorded, so a test can
// check what the driver handed over.
//
// mock_teacher<Logits, Logprobs> exposes logits and/or logprobs, plus topk and entropy
// (not used by the driver; present so the teacher concepts can be checked).
//
// Test-only code; nothing here is part of the library.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

#include <tropd/core/random.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/views.hpp>
#include <tropd/runtime/concepts.hpp>

namespace tropd_test::mock {

using tropd::index_t;

/// The closed-form next-token logits of one model.
struct closed_form {
  int V = 7;
  float amp = 0.5f;
  std::vector<float> theta;  ///< [(V+1) x V]; row V is the empty context

  int bos() const noexcept { return V; }

  /// z_v(prev, pos); prev in [0, V] (V = empty context).
  float logit(int prev, index_t pos, int v) const noexcept {
    return theta[static_cast<size_t>(prev) * static_cast<size_t>(V) + static_cast<size_t>(v)] +
           amp * std::sin(0.5f * static_cast<float>(pos) + 0.9f * static_cast<float>(v));
  }

  /// theta entries uniform in [-scale, scale] from Philox keyed by `seed` (any fixed rule works).
  static closed_form make(int V, uint64_t seed, float scale, float amp = 0.5f) {
    closed_form c;
    c.V = V;
    c.amp = amp;
    c.theta.resize(static_cast<size_t>((V + 1) * V));
    for (size_t i = 0; i < c.theta.size(); ++i) {
      const double u = tropd::uniform_open0_closed1(tropd::draw_key{seed, 0, 0, i, 0x6d74u});
      c.theta[i] = static_cast<float>(scale * (2.0 * u - 1.0));
    }
    return c;
  }
};

/// (prev, pos) of every row of a flat batch (CSR offsets): prev = bos() at a sequence start.
struct row_context {
  int prev = 0;
  index_t pos = 0;
};
inline std::vector<row_context> row_contexts(std::span<const int32_t> tokens, std::span<const index_t> offsets, int bos) {
  std::vector<row_context> out(tokens.size());
  for (size_t j = 0; j + 1 < offsets.size(); ++j)
    for (index_t i = offsets[j]; i < offsets[j + 1]; ++i)
      out[static_cast<size_t>(i)] = {i == offsets[j] ? bos : tokens[static_cast<size_t>(i - 1)], i - offsets[j]};
  return out;
}

/// Shape check shared by the mocks: offsets form valid CSR over the tokens.
inline bool valid_batch(const tropd::runtime::sequence_batch& b) {
  if (b.seq_offsets.size() < 1 || b.seq_offsets.front() != 0 || b.seq_offsets.back() != b.size()) return false;
  for (size_t j = 1; j < b.seq_offsets.size(); ++j)
    if (b.seq_offsets[j] < b.seq_offsets[j - 1]) return false;
  return true;
}

/// Log-softmax of a row in double (the mock's own arithmetic).
inline void log_softmax_row(const closed_form& cf, int prev, index_t pos, std::vector<double>& ls) {
  ls.resize(static_cast<size_t>(cf.V));
  double mx = -INFINITY;
  for (int v = 0; v < cf.V; ++v) {
    ls[static_cast<size_t>(v)] = cf.logit(prev, pos, v);
    mx = std::max(mx, ls[static_cast<size_t>(v)]);
  }
  double s = 0;
  for (double x : ls) s += std::exp(x - mx);
  const double lse = mx + std::log(s);
  for (double& x : ls) x -= lse;
}

inline constexpr uint32_t sample_stream = 0x6d73u;  // "ms"

/// A student model (see the header comment).
template <bool Logits, bool Logprobs>
class mock_student {
 public:
  closed_form cf;
  long long end_token = -1;

  // Recorded calls.
  int sample_calls = 0, logits_calls = 0, logprobs_calls = 0, backward_calls = 0;
  std::vector<uint64_t> seeds;                     ///< seed of every sample call
  std::vector<std::vector<int32_t>> contexts;      ///< context of every sample call
  std::vector<std::vector<int32_t>> outputs;       ///< continuation returned by every sample call
  std::vector<int32_t> last_tokens;                ///< batch of the last backward call
  std::vector<index_t> last_offsets;
  std::vector<float> last_grad;                    ///< [n x V] of the last backward_logits
  std::vector<float> last_dlds;                    ///< [n] of the last backward_logprobs
  std::vector<double> grad_theta;                  ///< [(V+1) x V] accumulated dL/dtheta

  explicit mock_student(closed_form c, long long end = -1) : cf(std::move(c)), end_token(end) {
    grad_theta.assign(cf.theta.size(), 0.0);
  }

  index_t vocab_size() const { return cf.V; }

  /// Ancestral sampling: token k of the continuation uses U_k = Philox(seed, k) and the
  /// inverse CDF of softmax(z / temperature) at (prev, pos = context size + k).
  std::vector<int32_t> sample(std::span<const int32_t> context, int max_new, double temperature, uint64_t seed) {
    ++sample_calls;
    seeds.push_back(seed);
    contexts.emplace_back(context.begin(), context.end());
    std::vector<int32_t> out;
    int prev = context.empty() ? cf.bos() : context.back();
    std::vector<double> w(static_cast<size_t>(cf.V));
    for (int k = 0; k < max_new; ++k) {
      const index_t pos = static_cast<index_t>(context.size()) + k;
      double mx = -INFINITY;
      for (int v = 0; v < cf.V; ++v) mx = std::max(mx, double(cf.logit(prev, pos, v)) / temperature);
      double tot = 0;
      for (int v = 0; v < cf.V; ++v) tot += (w[static_cast<size_t>(v)] = std::exp(double(cf.logit(prev, pos, v)) / temperature - mx));
      const double u = tropd::uniform_open0_closed1(tropd::draw_key{seed, 0, 0, static_cast<uint64_t>(k), sample_stream}) * tot;
      int y = cf.V - 1;
      double c = 0;
      for (int v = 0; v < cf.V; ++v) {
        c += w[static_cast<size_t>(v)];
        if (u <= c) { y = v; break; }
      }
      out.push_back(y);
      prev = y;
      if (end_token >= 0 && y == end_token) break;
    }
    outputs.push_back(out);
    return out;
  }

  tropd::status logits(const tropd::runtime::sequence_batch& b, tropd::matrix_view<float> out)
    requires Logits
  {
    ++logits_calls;
    if (!valid_batch(b) || out.rows != b.size() || out.cols != cf.V) return tropd::make_error(tropd::errc::shape_mismatch, "mock");
    const auto rc = row_contexts(b.tokens, b.seq_offsets, cf.bos());
    for (index_t i = 0; i < b.size(); ++i)
      for (int v = 0; v < cf.V; ++v) out(i, v) = cf.logit(rc[static_cast<size_t>(i)].prev, rc[static_cast<size_t>(i)].pos, v);
    return {};
  }

  tropd::status backward_logits(const tropd::runtime::sequence_batch& b, tropd::matrix_view<const float> g)
    requires Logits
  {
    ++backward_calls;
    if (!valid_batch(b) || g.rows != b.size() || g.cols != cf.V) return tropd::make_error(tropd::errc::shape_mismatch, "mock");
    record(b);
    last_grad.assign(static_cast<size_t>(b.size() * cf.V), 0.f);
    const auto rc = row_contexts(b.tokens, b.seq_offsets, cf.bos());
    for (index_t i = 0; i < b.size(); ++i)
      for (int v = 0; v < cf.V; ++v) {
        last_grad[static_cast<size_t>(i * cf.V + v)] = g(i, v);
        grad_theta[static_cast<size_t>(rc[static_cast<size_t>(i)].prev * cf.V + v)] += g(i, v);
      }
    return {};
  }

  tropd::status logprobs(const tropd::runtime::sequence_batch& b, tropd::vector_view<float> out)
    requires Logprobs
  {
    ++logprobs_calls;
    if (!valid_batch(b) || out.size != b.size()) return tropd::make_error(tropd::errc::shape_mismatch, "mock");
    const auto rc = row_contexts(b.tokens, b.seq_offsets, cf.bos());
    std::vector<double> ls;
    for (index_t i = 0; i < b.size(); ++i) {
      log_softmax_row(cf, rc[static_cast<size_t>(i)].prev, rc[static_cast<size_t>(i)].pos, ls);
      out[i] = static_cast<float>(ls[static_cast<size_t>(b.tokens[static_cast<size_t>(i)])]);
    }
    return {};
  }

  tropd::status backward_logprobs(const tropd::runtime::sequence_batch& b, tropd::vector_view<const float> g)
    requires Logprobs
  {
    ++backward_calls;
    if (!valid_batch(b) || g.size != b.size()) return tropd::make_error(tropd::errc::shape_mismatch, "mock");
    record(b);
    last_dlds.assign(g.begin(), g.end());
    const auto rc = row_contexts(b.tokens, b.seq_offsets, cf.bos());
    std::vector<double> ls;
    for (index_t i = 0; i < b.size(); ++i) {
      const int prev = rc[static_cast<size_t>(i)].prev;
      log_softmax_row(cf, prev, rc[static_cast<size_t>(i)].pos, ls);
      const int y = b.tokens[static_cast<size_t>(i)];
      for (int v = 0; v < cf.V; ++v)
        grad_theta[static_cast<size_t>(prev * cf.V + v)] += double(g[i]) * ((v == y ? 1.0 : 0.0) - std::exp(ls[static_cast<size_t>(v)]));
    }
    return {};
  }

 private:
  void record(const tropd::runtime::sequence_batch& b) {
    last_tokens.assign(b.tokens.begin(), b.tokens.end());
    last_offsets.assign(b.seq_offsets.begin(), b.seq_offsets.end());
  }
};

/// A teacher model (see the header comment).
template <bool Logits = true, bool Logprobs = true>
class mock_teacher {
 public:
  closed_form cf;
  int logits_calls = 0, logprobs_calls = 0;

  explicit mock_teacher(closed_form c) : cf(std::move(c)) {}

  index_t vocab_size() const { return cf.V; }

  tropd::status logits(const tropd::runtime::sequence_batch& b, tropd::matrix_view<float> out)
    requires Logits
  {
    ++logits_calls;
    if (!valid_batch(b) || out.rows != b.size() || out.cols != cf.V) return tropd::make_error(tropd::errc::shape_mismatch, "mock");
    const auto rc = row_contexts(b.tokens, b.seq_offsets, cf.bos());
    for (index_t i = 0; i < b.size(); ++i)
      for (int v = 0; v < cf.V; ++v) out(i, v) = cf.logit(rc[static_cast<size_t>(i)].prev, rc[static_cast<size_t>(i)].pos, v);
    return {};
  }

  tropd::status logprobs(const tropd::runtime::sequence_batch& b, tropd::vector_view<float> out)
    requires Logprobs
  {
    ++logprobs_calls;
    if (!valid_batch(b) || out.size != b.size()) return tropd::make_error(tropd::errc::shape_mismatch, "mock");
    const auto rc = row_contexts(b.tokens, b.seq_offsets, cf.bos());
    std::vector<double> ls;
    for (index_t i = 0; i < b.size(); ++i) {
      log_softmax_row(cf, rc[static_cast<size_t>(i)].prev, rc[static_cast<size_t>(i)].pos, ls);
      out[i] = static_cast<float>(ls[static_cast<size_t>(b.tokens[static_cast<size_t>(i)])]);
    }
    return {};
  }

  /// Top-k ids and log-probs per row, strongest first; k > V pads with id 0 and -inf.
  tropd::status topk(const tropd::runtime::sequence_batch& b, int k, tropd::matrix_view<int32_t> ids, tropd::matrix_view<float> lp) {
    if (!valid_batch(b) || k < 1 || ids.rows != b.size() || lp.rows != b.size() || ids.cols != k || lp.cols != k)
      return tropd::make_error(tropd::errc::shape_mismatch, "mock");
    const auto rc = row_contexts(b.tokens, b.seq_offsets, cf.bos());
    std::vector<double> ls;
    std::vector<int> order(static_cast<size_t>(cf.V));
    for (index_t i = 0; i < b.size(); ++i) {
      log_softmax_row(cf, rc[static_cast<size_t>(i)].prev, rc[static_cast<size_t>(i)].pos, ls);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return ls[static_cast<size_t>(x)] > ls[static_cast<size_t>(y)]; });
      for (int j = 0; j < k; ++j) {
        ids(i, j) = j < cf.V ? order[static_cast<size_t>(j)] : 0;
        lp(i, j) = j < cf.V ? static_cast<float>(ls[static_cast<size_t>(order[static_cast<size_t>(j)])]) : -INFINITY;
      }
    }
    return {};
  }

  /// Full-vocabulary entropy per row.
  tropd::status entropy(const tropd::runtime::sequence_batch& b, tropd::vector_view<float> out) {
    if (!valid_batch(b) || out.size != b.size()) return tropd::make_error(tropd::errc::shape_mismatch, "mock");
    const auto rc = row_contexts(b.tokens, b.seq_offsets, cf.bos());
    std::vector<double> ls;
    for (index_t i = 0; i < b.size(); ++i) {
      log_softmax_row(cf, rc[static_cast<size_t>(i)].prev, rc[static_cast<size_t>(i)].pos, ls);
      double h = 0;
      for (double x : ls) h -= std::exp(x) * x;
      out[i] = static_cast<float>(h);
    }
    return {};
  }
};

using logits_student = mock_student<true, false>;   ///< row path only
using logprob_student = mock_student<false, true>;  ///< token path only
using full_student = mock_student<true, true>;      ///< both (row path unless force_token_path)
using full_teacher = mock_teacher<true, true>;
using logprob_teacher = mock_teacher<false, true>;

}  // namespace tropd_test::mock
