// gradcheck.hpp: an independent check of mlp.hpp's hand-written backpropagation.
//
// reference_logits() recomputes the model's logits in double precision with plain loops
// straight from the definition (concatenated window embeddings times W1, position row,
// tanh, output layer), sharing no code with mlp_lm's table-based forward. check_gradients()
// draws a random dL/dz matrix G, lets mlp_lm::backward_logits turn it into parameter
// gradients, and compares them with central finite differences of sum(G * Z) computed by the
// reference, on a sample of entries of every parameter block. tests/test_demo.cpp asserts
// the result; tropd-demo runs it once at start-up and prints it.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "mlp.hpp"
#include "rng.hpp"

namespace demo {

/// Logits [n x V] (row-major) of the model with parameters `theta` on the sequences of
/// `tokens` split by `offsets`, from the definition, in double.
inline std::vector<double> reference_logits(const mlp_config& c, const std::vector<double>& theta,
                                            std::span<const int32_t> tokens, std::span<const tropd::index_t> offsets) {
  const mlp_layout l = layout_of(c);
  const int V = c.vocab, W = c.window, d = c.embed, H = c.hidden;
  const size_t n = tokens.size();
  std::vector<double> z(n * size_t(V), 0.0);
  std::vector<double> h(static_cast<size_t>(H));
  for (size_t s = 0; s + 1 < offsets.size(); ++s)
    for (tropd::index_t i = offsets[s]; i < offsets[s + 1]; ++i) {
      const long long pos = std::min<long long>(i - offsets[s], c.max_positions - 1);
      for (int k = 0; k < H; ++k) {
        double a = theta[l.b1 + size_t(k)] + theta[l.P + size_t(pos) * size_t(H) + size_t(k)];
        for (int w = 0; w < W; ++w) {
          const tropd::index_t at = i - W + w;
          const int32_t tok = at >= offsets[s] ? tokens[size_t(at)] : c.pad;
          for (int e = 0; e < d; ++e)
            a += theta[l.E + size_t(tok) * size_t(d) + size_t(e)] *
                 theta[l.W1 + (size_t(w) * size_t(d) + size_t(e)) * size_t(H) + size_t(k)];
        }
        h[size_t(k)] = std::tanh(a);
      }
      for (int v = 0; v < V; ++v) {
        double acc = theta[l.b2 + size_t(v)];
        for (int k = 0; k < H; ++k) acc += h[size_t(k)] * theta[l.W2 + size_t(k) * size_t(V) + size_t(v)];
        z[size_t(i) * size_t(V) + size_t(v)] = acc;
      }
    }
  return z;
}

struct gradcheck_result {
  double logit_error = 0;     ///< max |mlp_lm logits - reference logits|
  double gradient_error = 0;  ///< max over blocks of max |g - fd| / max |fd| on the sampled entries
  double max_gradient = 0;    ///< max |fd| over the sampled entries (to see the check is not vacuous)
  int entries = 0;            ///< entries compared
};

/// Checks `model` (its parameters are not changed; its gradient buffer is overwritten) on
/// the batch (tokens, offsets) with a random G drawn from `seed`; `per_block` entries of
/// each parameter block are compared (rows of E and P that the batch uses).
inline gradcheck_result check_gradients(mlp_lm& model, std::span<const int32_t> tokens, std::span<const tropd::index_t> offsets,
                                        uint64_t seed, int per_block = 24, double h = 1e-4) {
  const mlp_config& c = model.config();
  const mlp_layout l = model.layout();
  const tropd::index_t n = static_cast<tropd::index_t>(tokens.size()), V = c.vocab;
  rng r(seed);
  std::vector<float> G(size_t(n) * size_t(V));
  for (float& g : G) g = float(2.0 * r.uniform() - 1.0);

  tropd::runtime::sequence_batch b{tokens, offsets};
  std::vector<float> Z(size_t(n) * size_t(V));
  model.zero_grad();
  tropd::throw_if_error(model.logits(b, tropd::make_matrix(Z.data(), n, V)));
  tropd::throw_if_error(model.backward_logits(b, tropd::make_matrix<const float>(G.data(), n, V)));
  const std::vector<float> grad(model.gradient().begin(), model.gradient().end());

  std::vector<double> theta(model.parameters().begin(), model.parameters().end());
  gradcheck_result res;
  const std::vector<double> zr = reference_logits(c, theta, tokens, offsets);
  for (size_t i = 0; i < zr.size(); ++i) res.logit_error = std::max(res.logit_error, std::abs(double(Z[i]) - zr[i]));

  auto objective = [&](const std::vector<double>& th) {
    const std::vector<double> z = reference_logits(c, th, tokens, offsets);
    double s = 0;
    for (size_t i = 0; i < z.size(); ++i) s += double(G[i]) * z[i];
    return s;
  };
  // Rows of E and P the batch touches (others have zero gradient, also checked below).
  std::vector<int32_t> used_tokens(tokens.begin(), tokens.end());
  used_tokens.push_back(c.pad);
  std::sort(used_tokens.begin(), used_tokens.end());
  used_tokens.erase(std::unique(used_tokens.begin(), used_tokens.end()), used_tokens.end());
  long long max_len = 0;
  for (size_t s = 0; s + 1 < offsets.size(); ++s) max_len = std::max<long long>(max_len, offsets[s + 1] - offsets[s]);
  max_len = std::min<long long>(max_len, c.max_positions);

  struct block { size_t begin, end; int row_width; const std::vector<int32_t>* rows; long long nrows; };
  const std::vector<block> blocks = {
      {l.E, l.W1, c.embed, &used_tokens, 0},       {l.W1, l.b1, 0, nullptr, 0}, {l.b1, l.P, 0, nullptr, 0},
      {l.P, l.W2, c.hidden, nullptr, max_len},     {l.W2, l.b2, 0, nullptr, 0}, {l.b2, l.total, 0, nullptr, 0}};
  for (const block& bl : blocks) {
    double err = 0, scale = 0;
    for (int k = 0; k < per_block; ++k) {
      size_t idx;
      if (bl.rows) {
        const int32_t row = (*bl.rows)[size_t(r.below(int(bl.rows->size())))];
        idx = bl.begin + size_t(row) * size_t(bl.row_width) + size_t(r.below(bl.row_width));
      } else if (bl.nrows > 0) {
        idx = bl.begin + size_t(r.below(int(bl.nrows))) * size_t(bl.row_width) + size_t(r.below(bl.row_width));
      } else {
        idx = bl.begin + size_t(r.below(int(bl.end - bl.begin)));
      }
      const double keep = theta[idx];
      theta[idx] = keep + h;
      const double up = objective(theta);
      theta[idx] = keep - h;
      const double down = objective(theta);
      theta[idx] = keep;
      const double fd = (up - down) / (2 * h);
      err = std::max(err, std::abs(double(grad[idx]) - fd));
      scale = std::max(scale, std::abs(fd));
      ++res.entries;
    }
    res.gradient_error = std::max(res.gradient_error, err / std::max(scale, 1e-12));
    res.max_gradient = std::max(res.max_gradient, scale);
  }
  model.zero_grad();
  return res;
}

}  // namespace demo
