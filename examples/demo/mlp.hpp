// mlp.hpp: a window MLP language model in Eigen, with hand-written backpropagation and Adam.
//
//   a   = b1 + P[pos] + sum_w E[tok(i-W+w)] W1_w   (W embeddings of size d, PAD before the
//                                                   sequence start; P: a learned position row)
//   h   = tanh(a)                                  (hidden size H)
//   z   = h W2 + b2                                (logits over the V tokens)
//
// W1_w is the [d x H] block of W1 that window slot w multiplies, so x W1 with x the
// concatenated embeddings is the sum above. The sum is computed through a table
// T_w[v] = E[v] W1_w ([W x V x H], rebuilt after each parameter update), so a row costs W
// additions of an H-vector instead of a [W d x H] product; the output layer is the main cost.
//
// Row i of a batch predicts token i of its sequence from the W tokens before it and its
// position i - (start of its sequence), as tropd/runtime/concepts.hpp asks. The class
// satisfies tropd's student concepts (vocab_size, logits, backward_logits, sample) and
// teacher concepts (logits, logprobs): the student learns only from the dL/dz that
// tropd::runtime::distill_step hands to backward_logits; this file turns dL/dz into
// parameter gradients (output layer, tanh, position rows, and through the table into W1 and
// the embeddings) and Adam applies them. tests/test_demo.cpp checks them against finite
// differences of an independent double-precision forward (gradcheck.hpp).
//
// All parameters live in one flat float vector (layout() gives the pieces), so copying a
// model copies everything and the optimiser is a loop over one array.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include <Eigen/Dense>

#include <tropd/core/status.hpp>
#include <tropd/core/views.hpp>
#include <tropd/runtime/concepts.hpp>

#include "rng.hpp"

namespace demo {

using rmat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using rvec = Eigen::Matrix<float, 1, Eigen::Dynamic>;
using strided = Eigen::Map<rmat, 0, Eigen::OuterStride<>>;
using cstrided = Eigen::Map<const rmat, 0, Eigen::OuterStride<>>;

struct mlp_config {
  int vocab = 16;
  int window = 8;         ///< W previous tokens
  int embed = 16;         ///< d
  int hidden = 64;        ///< H
  int max_positions = 64; ///< position rows; later positions share the last one
  int32_t pad = 0;        ///< token id standing for "before the sequence start"
  int32_t eos = -1;       ///< sampling stops after this token (-1: never)
};

/// Offsets of the parameter blocks in the flat vector (row-major blocks).
struct mlp_layout {
  size_t E = 0, W1 = 0, b1 = 0, P = 0, W2 = 0, b2 = 0, total = 0;
};

inline mlp_layout layout_of(const mlp_config& c) {
  const size_t V = size_t(c.vocab), W = size_t(c.window), d = size_t(c.embed), H = size_t(c.hidden),
               L = size_t(c.max_positions);
  mlp_layout l;
  l.E = 0;
  l.W1 = l.E + V * d;
  l.b1 = l.W1 + W * d * H;
  l.P = l.b1 + H;
  l.W2 = l.P + L * H;
  l.b2 = l.W2 + H * V;
  l.total = l.b2 + V;
  return l;
}

class mlp_lm {
 public:
  mlp_lm() = default;

  /// Random initialisation from `seed`: embeddings N(0, 1), W1 N(0, 1 / (W d)), positions
  /// N(0, 0.1^2), W2 N(0, 1 / H), zero biases.
  mlp_lm(const mlp_config& c, uint64_t seed) : cfg_(c), lay_(layout_of(c)) {
    theta_.assign(lay_.total, 0.f);
    grad_.assign(lay_.total, 0.f);
    m_.assign(lay_.total, 0.f);
    v_.assign(lay_.total, 0.f);
    rng r(seed);
    const double s1 = 1.0 / std::sqrt(double(c.window * c.embed)), s2 = 1.0 / std::sqrt(double(c.hidden));
    for (size_t i = lay_.E; i < lay_.W1; ++i) theta_[i] = float(r.normal());
    for (size_t i = lay_.W1; i < lay_.b1; ++i) theta_[i] = float(s1 * r.normal());
    for (size_t i = lay_.P; i < lay_.W2; ++i) theta_[i] = float(0.1 * r.normal());
    for (size_t i = lay_.W2; i < lay_.b2; ++i) theta_[i] = float(s2 * r.normal());
  }

  /// Makes the input embedding of every token v with base[v] != v equal to its base token's
  /// plus N(0, sigma^2) noise: the surface variants of a symbol start close to it, as in a
  /// pretrained model (the output layer is left alone).
  void tie_embeddings(const std::vector<int32_t>& base, double sigma, uint64_t seed) {
    rng r(seed);
    const size_t d = size_t(cfg_.embed);
    for (size_t v = 0; v < base.size(); ++v) {
      if (base[v] == int32_t(v)) continue;
      for (size_t e = 0; e < d; ++e)
        theta_[lay_.E + v * d + e] = theta_[lay_.E + size_t(base[v]) * d + e] + float(sigma * r.normal());
    }
    table_ok_ = false;
  }

  const mlp_config& config() const { return cfg_; }
  const mlp_layout& layout() const { return lay_; }
  size_t num_parameters() const { return theta_.size(); }
  /// The flat parameters (writing them invalidates the sampling table: call touched()).
  std::span<float> parameters() { return theta_; }
  std::span<const float> parameters() const { return theta_; }
  std::span<const float> gradient() const { return grad_; }
  void touched() { table_ok_ = false; }

  // ---------------------------------------------------------------- tropd's model concepts
  tropd::index_t vocab_size() const { return cfg_.vocab; }

  /// Logits [n x V] of every row of the batch (caches the activations for backward_logits).
  tropd::status logits(const tropd::runtime::sequence_batch& b, tropd::matrix_view<float> out) {
    TROPD_TRY(check(b, out.rows, out.cols));
    forward(b);
    strided Z(out.data, out.rows, out.cols, Eigen::OuterStride<>(out.stride));
    Z.noalias() = H_ * W2();
    Z.rowwise() += b2();
    return {};
  }

  /// log p(tokens[i] | the W tokens before it, position) for every row.
  tropd::status logprobs(const tropd::runtime::sequence_batch& b, tropd::vector_view<float> out) {
    TROPD_TRY(check(b, out.size, cfg_.vocab));
    forward(b);
    rmat Z = H_ * W2();
    Z.rowwise() += b2();
    for (tropd::index_t i = 0; i < out.size; ++i) {
      const float m = Z.row(i).maxCoeff();
      const double lse = double(m) + std::log(double((Z.row(i).array() - m).exp().sum()));
      out[i] = float(double(Z(i, b.tokens[size_t(i)])) - lse);
    }
    return {};
  }

  /// Accumulates the parameter gradients of a loss whose gradient with respect to the
  /// logits of `b` is g [n x V] (the dL/dz of tropd's row path).
  tropd::status backward_logits(const tropd::runtime::sequence_batch& b, tropd::matrix_view<const float> g) {
    TROPD_TRY(check(b, g.rows, g.cols));
    if (!same_as_cached(b)) forward(b);  // the driver calls logits() on this batch just before
    cstrided G(g.data, g.rows, g.cols, Eigen::OuterStride<>(g.stride));
    backward(G);
    return {};
  }

  /// Samples a continuation of `context` (stops after EOS), deterministic in `seed`;
  /// temperature <= 0 decodes greedily.
  std::vector<int32_t> sample(std::span<const int32_t> context, int max_new, double temperature, uint64_t seed) {
    refresh_table();
    const int W = cfg_.window, H = cfg_.hidden, V = cfg_.vocab;
    std::vector<int32_t> seq(context.begin(), context.end()), out;
    rng r(seed);
    rvec a(H), h(H), z(V);
    for (int step = 0; step < max_new; ++step) {
      const long long n = static_cast<long long>(seq.size());
      a = b1() + P().row(std::min<long long>(n, cfg_.max_positions - 1));
      for (int w = 0; w < W; ++w) {
        const long long pos = n - W + w;
        const int32_t tok = pos >= 0 ? seq[size_t(pos)] : cfg_.pad;
        a += Eigen::Map<const rvec>(table_.data() + (size_t(w) * size_t(V) + size_t(tok)) * size_t(H), H);
      }
      h = a.array().tanh();
      z.noalias() = h * W2();
      z += b2();
      const double u = temperature > 0 ? r.uniform() : 0.0;
      const int32_t y = sample_logits(z.data(), V, temperature, u, scratch_);
      out.push_back(y);
      seq.push_back(y);
      if (y == cfg_.eos) break;
    }
    return out;
  }

  // ---------------------------------------------------------------- training helpers
  void zero_grad() { std::fill(grad_.begin(), grad_.end(), 0.f); }

  double grad_norm() const {
    double s = 0;
    for (float g : grad_) s += double(g) * double(g);
    return std::sqrt(s);
  }

  /// One Adam step (beta1 0.9, beta2 0.999, eps 1e-8) on the accumulated gradients.
  void adam_step(double lr, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8) {
    ++t_;
    const double c1 = 1.0 - std::pow(beta1, double(t_)), c2 = 1.0 - std::pow(beta2, double(t_));
    const float b1f = float(beta1), b2f = float(beta2);
    const float step = float(lr / c1), ic2 = float(1.0 / c2), e = float(eps);
    for (size_t i = 0; i < theta_.size(); ++i) {
      const float g = grad_[i];
      m_[i] = b1f * m_[i] + (1.f - b1f) * g;
      v_[i] = b2f * v_[i] + (1.f - b2f) * g * g;
      theta_[i] -= step * m_[i] / (std::sqrt(v_[i] * ic2) + e);
    }
    table_ok_ = false;
  }

  /// Resets the optimiser state (a fresh Adam for a new training phase).
  void reset_optimizer() {
    std::fill(m_.begin(), m_.end(), 0.f);
    std::fill(v_.begin(), v_.end(), 0.f);
    t_ = 0;
  }

  bool parameters_finite() const {
    for (float x : theta_)
      if (!std::isfinite(x)) return false;
    return true;
  }

  /// Supervised step: mean cross-entropy of targets[i] over the rows with train_row[i] != 0
  /// (the contexts are b's tokens, so targets may differ from them), then Adam. Returns the
  /// mean cross-entropy.
  double sft_step(const tropd::runtime::sequence_batch& b, const std::vector<int32_t>& targets,
                  const std::vector<uint8_t>& train_row, double lr) {
    const tropd::index_t n = b.size(), V = cfg_.vocab;
    rmat Z(n, V);
    (void)logits(b, tropd::make_matrix(Z.data(), n, V));
    rmat G = rmat::Zero(n, V);
    double loss = 0, count = 0;
    for (tropd::index_t i = 0; i < n; ++i) count += train_row[size_t(i)] ? 1 : 0;
    for (tropd::index_t i = 0; i < n; ++i) {
      if (!train_row[size_t(i)]) continue;
      const float m = Z.row(i).maxCoeff();
      rvec p = (Z.row(i).array() - m).exp();
      const float s = p.sum();
      p /= s;
      const int32_t y = targets[size_t(i)];
      loss -= double(Z(i, y) - m) - std::log(double(s));
      G.row(i) = p / float(count);
      G(i, y) -= 1.f / float(count);
    }
    zero_grad();
    backward(cstrided(G.data(), n, V, Eigen::OuterStride<>(V)));
    adam_step(lr);
    return loss / count;
  }

 private:
  // Parameter views.
  Eigen::Map<rmat> E() { return {theta_.data() + lay_.E, cfg_.vocab, cfg_.embed}; }
  Eigen::Map<rmat> W1() { return {theta_.data() + lay_.W1, cfg_.window * cfg_.embed, cfg_.hidden}; }
  Eigen::Map<rvec> b1() { return {theta_.data() + lay_.b1, cfg_.hidden}; }
  Eigen::Map<rmat> P() { return {theta_.data() + lay_.P, cfg_.max_positions, cfg_.hidden}; }
  Eigen::Map<rmat> W2() { return {theta_.data() + lay_.W2, cfg_.hidden, cfg_.vocab}; }
  Eigen::Map<rvec> b2() { return {theta_.data() + lay_.b2, cfg_.vocab}; }
  Eigen::Map<rmat> gE() { return {grad_.data() + lay_.E, cfg_.vocab, cfg_.embed}; }
  Eigen::Map<rmat> gW1() { return {grad_.data() + lay_.W1, cfg_.window * cfg_.embed, cfg_.hidden}; }
  Eigen::Map<rvec> gb1() { return {grad_.data() + lay_.b1, cfg_.hidden}; }
  Eigen::Map<rmat> gP() { return {grad_.data() + lay_.P, cfg_.max_positions, cfg_.hidden}; }
  Eigen::Map<rmat> gW2() { return {grad_.data() + lay_.W2, cfg_.hidden, cfg_.vocab}; }
  Eigen::Map<rvec> gb2() { return {grad_.data() + lay_.b2, cfg_.vocab}; }

  tropd::status check(const tropd::runtime::sequence_batch& b, tropd::index_t rows, tropd::index_t cols) const {
    const tropd::index_t n = b.size();
    if (n == 0) return tropd::make_error(tropd::errc::empty_batch, "mlp_lm: empty batch");
    if (rows != n || cols != cfg_.vocab) return tropd::make_error(tropd::errc::shape_mismatch, "mlp_lm: output shape");
    if (b.seq_offsets.size() < 2 || b.seq_offsets.front() != 0 || b.seq_offsets.back() != n)
      return tropd::make_error(tropd::errc::shape_mismatch, "mlp_lm: bad seq_offsets");
    for (tropd::index_t i = 0; i < n; ++i)
      if (b.tokens[size_t(i)] < 0 || b.tokens[size_t(i)] >= cfg_.vocab)
        return tropd::make_error(tropd::errc::id_out_of_range, "mlp_lm: token id", i);
    return {};
  }

  bool same_as_cached(const tropd::runtime::sequence_batch& b) const {
    return ctok_.size() == b.tokens.size() && coff_.size() == b.seq_offsets.size() &&
           std::equal(ctok_.begin(), ctok_.end(), b.tokens.begin()) &&
           std::equal(coff_.begin(), coff_.end(), b.seq_offsets.begin());
  }

  /// Builds the context ids, positions and H [n x H] for a batch.
  void forward(const tropd::runtime::sequence_batch& b) {
    refresh_table();
    const tropd::index_t n = b.size();
    const int W = cfg_.window, Hd = cfg_.hidden, V = cfg_.vocab;
    ctok_.assign(b.tokens.begin(), b.tokens.end());
    coff_.assign(b.seq_offsets.begin(), b.seq_offsets.end());
    ctx_.resize(size_t(n) * size_t(W));
    pos_.resize(size_t(n));
    for (size_t j = 0; j + 1 < coff_.size(); ++j)
      for (tropd::index_t i = coff_[j]; i < coff_[j + 1]; ++i) {
        pos_[size_t(i)] = int32_t(std::min<tropd::index_t>(i - coff_[j], cfg_.max_positions - 1));
        for (int w = 0; w < W; ++w) {
          const tropd::index_t at = i - W + w;
          ctx_[size_t(i) * size_t(W) + size_t(w)] = at >= coff_[j] ? ctok_[size_t(at)] : cfg_.pad;
        }
      }
    H_.resize(n, Hd);
    auto Pm = P();
    auto b1m = b1();
    for (tropd::index_t i = 0; i < n; ++i) {
      auto row = H_.row(i);
      row = b1m + Pm.row(pos_[size_t(i)]);
      for (int w = 0; w < W; ++w)
        row += Eigen::Map<const rvec>(
            table_.data() + (size_t(w) * size_t(V) + size_t(ctx_[size_t(i) * size_t(W) + size_t(w)])) * size_t(Hd), Hd);
    }
    H_ = H_.array().tanh();
  }

  /// Backward from dL/dz (uses the cached H, context ids and positions).
  template <class GM>
  void backward(const GM& G) {
    const tropd::index_t n = G.rows();
    const int W = cfg_.window, d = cfg_.embed, Hd = cfg_.hidden, V = cfg_.vocab;
    gW2().noalias() += H_.transpose() * G;
    add_column_sums(gb2().data(), G);
    rmat dA = G * W2().transpose();
    dA.array() *= (1.f - H_.array().square());
    add_column_sums(gb1().data(), dA);
    auto gPm = gP();
    for (tropd::index_t i = 0; i < n; ++i) gPm.row(pos_[size_t(i)]) += dA.row(i);
    // Through the table: dT_w[v] = sum of dA over the rows whose slot w holds v; then
    // dW1_w = E^T dT_w and dE += dT_w W1_w^T.
    auto Em = E();
    auto W1m = W1();
    auto gW1m = gW1();
    auto gEm = gE();
    dT_.resize(V, Hd);
    for (int w = 0; w < W; ++w) {
      dT_.setZero();
      for (tropd::index_t i = 0; i < n; ++i) dT_.row(ctx_[size_t(i) * size_t(W) + size_t(w)]) += dA.row(i);
      gW1m.middleRows(w * d, d).noalias() += Em.transpose() * dT_;
      gEm.noalias() += dT_ * W1m.middleRows(w * d, d).transpose();
    }
  }

  /// dst[j] += sum_i M(i, j), summed over i in order. (Eigen's colwise().sum() sums some
  /// columns in packets of four rows and others one by one depending on the destination's
  /// address, so its rounding would change with where the gradient buffer happens to lie.)
  template <class M>
  void add_column_sums(float* dst, const M& m) {
    const Eigen::Index c = m.cols();
    colsum_.assign(size_t(c), 0.f);
    float* acc = colsum_.data();
    for (Eigen::Index i = 0; i < m.rows(); ++i) {
      for (Eigen::Index j = 0; j < c; ++j) acc[j] += m(i, j);
    }
    for (Eigen::Index j = 0; j < c; ++j) dst[j] += acc[j];
  }

  /// Table T_w[v] = E[v] W1_w (a [H] row per window slot w and token v).
  void refresh_table() {
    if (table_ok_) return;
    const int W = cfg_.window, d = cfg_.embed, H = cfg_.hidden, V = cfg_.vocab;
    table_.resize(size_t(W) * size_t(V) * size_t(H));
    auto Em = E();
    auto W1m = W1();
    for (int w = 0; w < W; ++w) {
      Eigen::Map<rmat> T(table_.data() + size_t(w) * size_t(V) * size_t(H), V, H);
      T.noalias() = Em * W1m.middleRows(w * d, d);
    }
    table_ok_ = true;
  }

  mlp_config cfg_{};
  mlp_layout lay_{};
  std::vector<float> theta_, grad_, m_, v_;
  long long t_ = 0;
  // Forward cache for backward_logits.
  std::vector<int32_t> ctok_;
  std::vector<tropd::index_t> coff_;
  std::vector<int32_t> ctx_, pos_;
  rmat H_, dT_;
  std::vector<float> colsum_;
  // Table and sampling scratch.
  std::vector<float> table_;
  bool table_ok_ = false;
  Eigen::ArrayXf scratch_;
};

static_assert(tropd::runtime::student_with_logits<mlp_lm>);
static_assert(tropd::runtime::sampler<mlp_lm>);
static_assert(tropd::runtime::logits_source<mlp_lm>);
static_assert(tropd::runtime::logprob_source<mlp_lm>);

}  // namespace demo
