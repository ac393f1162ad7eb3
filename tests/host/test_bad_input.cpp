// Bad input: every entry point returns the documented errc, names the failing position, and
// (in the default non-fused mode) leaves every output untouched. Also the legal edge cases
// next to them: -inf logits are zero mass, not errors, wherever the divergence stays finite.
#include <stdint.h>

#include <climits>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/tropd.hpp>

#include "reference/helpers.hpp"
#include "reference/naive.hpp"

namespace naive = tropd_test::naive;
using tropd_test::ld;
using tropd_test::vec;
namespace est = tropd::estimators;
using tropd::errc;

namespace {

constexpr double sentinel = 12345.0;
constexpr float fnan = std::numeric_limits<float>::quiet_NaN();
constexpr float finf = std::numeric_limits<float>::infinity();
constexpr double dinf = std::numeric_limits<double>::infinity();

/// Sentinel-filled outputs for [rows x V].
template <class G>
struct outs {
  std::vector<double> loss;
  std::vector<G> grad;
  outs(int64_t rows, int64_t V) : loss(static_cast<size_t>(rows), sentinel), grad(static_cast<size_t>(rows * V), G(sentinel)) {}
  tropd::vector_view<double> lv() { return tropd::view_of(loss); }
  tropd::matrix_view<G> gv(int64_t rows, int64_t V) { return tropd::make_matrix(grad.data(), rows, V); }
  bool untouched() const {
    for (double l : loss)
      if (l != sentinel) return false;
    for (G g : grad)
      if (g != G(sentinel)) return false;
    return true;
  }
  bool rows_untouched(int64_t from, int64_t V) const {
    for (size_t i = static_cast<size_t>(from * V); i < grad.size(); ++i)
      if (grad[i] != G(sentinel)) return false;
    return true;
  }
};

template <class T>
tropd::matrix_view<const T> cm(const std::vector<T>& v, int64_t rows, int64_t cols, int64_t stride = -1) {
  return tropd::make_matrix(v.data(), rows, cols, stride);
}

/// Checks the code (and optionally the position) of a failed status.
void expect(const tropd::status& st, errc code, int64_t row = -2, int64_t col = -2) {
  CAPTURE(st.message());
  CHECK(st.code == code);
  if (row != -2) CHECK(st.row == row);
  if (col != -2) CHECK(st.col == col);
}

const int64_t R = 4, V = 1100;  // two chunks of the host backend per row

struct inputs {
  std::vector<float> z, u;
  inputs() {
    std::mt19937_64 rng(51);
    z = tropd_test::random_rows<float>(rng, R, V, 2.0);
    u = tropd_test::random_rows<float>(rng, R, V, 2.0);
  }
};

}  // namespace

TEST_CASE("bad input: shapes, strides and empty batches (divergence_rows)") {
  const inputs in;
  const est::forward_kl e;
  SUBCASE("teacher rows differ") {
    outs<float> o(R, V);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R - 1, V), o.lv(), o.gv(R, V)), errc::shape_mismatch);
    CHECK(o.untouched());
  }
  SUBCASE("teacher vocabulary differs") {
    outs<float> o(R, V);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V - 1), o.lv(), o.gv(R, V)), errc::shape_mismatch);
    CHECK(o.untouched());
  }
  SUBCASE("loss size differs") {
    outs<float> o(R, V);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V), tropd::make_vector(o.loss.data(), R - 1), o.gv(R, V)),
           errc::shape_mismatch);
    CHECK(o.untouched());
  }
  SUBCASE("gradient shape differs") {
    outs<float> o(R, V);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V - 1)), errc::shape_mismatch);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R - 1, V)), errc::shape_mismatch);
    CHECK(o.untouched());
  }
  SUBCASE("stride smaller than a row") {
    outs<float> o(R, V);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V, V - 1), cm(in.u, R, V), o.lv(), o.gv(R, V)), errc::shape_mismatch);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V, 5), o.lv(), o.gv(R, V)), errc::shape_mismatch);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V), o.lv(), tropd::make_matrix(o.grad.data(), R, V, V - 1)),
           errc::shape_mismatch);
    CHECK(o.untouched());
  }
  SUBCASE("null data, zero vocabulary, grad_scale and summaries of the wrong size") {
    outs<float> o(R, V);
    expect(tropd::host::divergence_rows(e, tropd::matrix_view<const float>{nullptr, R, V, V}, cm(in.u, R, V), o.lv(), o.gv(R, V)),
           errc::shape_mismatch);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, 0), cm(in.u, R, 0), o.lv(), tropd::matrix_view<float>{}), errc::shape_mismatch);
    const std::vector<double> scale(R - 1, 1.0);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V), {}, tropd::view_of(scale)),
           errc::shape_mismatch);
    std::vector<est::row_summary> sums(R + 1);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V), {}, {}, tropd::view_of(sums)),
           errc::shape_mismatch);
    // Null loss / grad_scale data with the right sizes (core/checks.hpp, shared with the GPU backend).
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V), tropd::vector_view<double>{nullptr, R}, o.gv(R, V)),
           errc::shape_mismatch);
    expect(tropd::host::divergence_rows(e, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V), {},
                                        tropd::vector_view<const double>{nullptr, R}),
           errc::shape_mismatch);
    CHECK(o.untouched());
  }
  SUBCASE("empty batch") {
    outs<float> o(R, V);
    expect(tropd::host::divergence_rows(e, cm(in.z, 0, V), cm(in.u, 0, V), tropd::make_vector(o.loss.data(), 0),
                                        tropd::make_matrix(o.grad.data(), 0, V)),
           errc::empty_batch);
    expect(tropd::host::sampled_rows(est::sampled<est::k1, est::as_pg_reward>{}, cm(in.z, 0, V), cm(in.u, 0, V),
                                     tropd::vector_view<const int32_t>{}, {}, tropd::make_vector(o.loss.data(), 0)),
           errc::empty_batch);
    expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{}, cm(in.z, 0, V), cm(in.u, 0, V), tropd::make_vector(o.loss.data(), 0)),
           errc::empty_batch);
    CHECK(o.untouched());
  }
}

TEST_CASE("bad input: non-finite logits name the row and column; status::message") {
  inputs in;
  SUBCASE("NaN in the student, second chunk") {
    in.z[2 * V + 1050] = fnan;
    outs<float> o(R, V);
    const auto st = tropd::host::divergence_rows(est::reverse_kl{}, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V));
    expect(st, errc::non_finite_input, 2, 1050);
    CHECK(o.untouched());
    const std::string msg = st.message();
    CHECK(msg.find("row 2") != std::string::npos);
    CHECK(msg.find("column 1050") != std::string::npos);
    CHECK(msg.find("non-finite input") != std::string::npos);
    CHECK(msg.find("student") != std::string::npos);
    bool thrown = false;
    try {
      tropd::throw_if_error(st);
    } catch (const tropd::error& err) {
      thrown = true;
      CHECK(std::string(err.what()) == msg);
      CHECK(err.get_status().code == errc::non_finite_input);
    }
    CHECK(thrown);
    CHECK_NOTHROW(tropd::throw_if_error(tropd::ok_status()));
  }
  SUBCASE("+inf in the teacher") {
    in.u[1 * V + 7] = finf;
    outs<float> o(R, V);
    const auto st = tropd::host::divergence_rows(est::forward_kl{}, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V));
    expect(st, errc::non_finite_input, 1, 7);
    CHECK(st.message().find("teacher") != std::string::npos);
    CHECK(o.untouched());
    outs<float> o2(R, V);
    std::vector<int32_t> ids(R, 3);
    expect(tropd::host::sampled_rows(est::sampled<est::k2, est::as_loss>{}, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(ids), {}, o2.lv(),
                                     o2.gv(R, V)),
           errc::non_finite_input, 1, 7);
    expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{}, cm(in.z, R, V), cm(in.u, R, V), o2.lv(), o2.gv(R, V)),
           errc::non_finite_input, 1, 7);
    CHECK(o2.untouched());
  }
  SUBCASE("NaN and +inf in 16-bit inputs") {
    std::vector<tropd::bf16> zb(in.z.size());
    std::vector<tropd::fp16> uh(in.u.size());
    for (size_t i = 0; i < zb.size(); ++i) {
      zb[i] = tropd::bf16::from_float(in.z[i]);
      uh[i] = tropd::fp16::from_float(in.u[i]);
    }
    outs<float> o(R, V);
    zb[3 * V + 1099] = tropd::bf16::from_float(fnan);
    expect(tropd::host::divergence_rows(est::jsd{}, cm(zb, R, V), cm(uh, R, V), o.lv(), o.gv(R, V)), errc::non_finite_input, 3, 1099);
    uh[0 * V + 0] = tropd::fp16{0x7C00};  // +inf; reported first (row 0)
    expect(tropd::host::divergence_rows(est::jsd{}, cm(zb, R, V), cm(uh, R, V), o.lv(), o.gv(R, V)), errc::non_finite_input, 0, 0);
    CHECK(o.untouched());
  }
  SUBCASE("a row with no finite entry") {
    for (int64_t j = 0; j < V; ++j) in.z[static_cast<size_t>(3 * V + j)] = -finf;
    outs<float> o(R, V);
    expect(tropd::host::divergence_rows(est::forward_kl{}, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V)), errc::no_finite_entry, 3);
    std::vector<int32_t> ids(R, 0);
    expect(tropd::host::sampled_rows(est::sampled<est::k3, est::as_loss>{}, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(ids), {},
                                     o.lv(), o.gv(R, V)),
           errc::no_finite_entry, 3);
    CHECK(o.untouched());
    inputs in2;
    for (int64_t j = 0; j < V; ++j) in2.u[static_cast<size_t>(0 * V + j)] = -finf;
    expect(tropd::host::divergence_rows(est::reverse_kl{}, cm(in2.z, R, V), cm(in2.u, R, V), o.lv(), o.gv(R, V)), errc::no_finite_entry, 0);
    CHECK(o.untouched());
  }
  SUBCASE("the smallest failing row is reported, whatever the threads and order") {
    in.z[3 * V + 5] = fnan;
    in.u[1 * V + 900] = fnan;
    for (bool fused : {false, true})
      for (int threads : {1, 2, 4}) {
        CAPTURE(fused);
        CAPTURE(threads);
        tropd::host::row_options opt;
        opt.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
        opt.threads = threads;
        outs<float> o(R, V);
        expect(tropd::host::divergence_rows(est::total_variation{}, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V), opt),
               errc::non_finite_input, 1, 900);
        for (double l : o.loss) CHECK(l == sentinel);  // losses are untouched in both orders
        if (!fused) CHECK(o.untouched());
        if (fused && threads == 1) CHECK(o.rows_untouched(1, V));  // rows from the failing one on
      }
  }
}

TEST_CASE("bad input: parameters outside their domain") {
  const inputs in;
  outs<float> o(R, V);
  for (double beta : {1.5, -0.1, std::numeric_limits<double>::quiet_NaN()}) {
    CAPTURE(beta);
    expect(tropd::host::divergence_rows(est::jsd{beta}, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V)), errc::invalid_parameter);
  }
  for (double T : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(), dinf}) {
    CAPTURE(T);
    tropd::host::row_options s, t;
    s.student_temperature = T;
    t.teacher_temperature = T;
    for (const auto& opt : {s, t}) {
      expect(tropd::host::divergence_rows(est::reverse_kl{}, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V), opt),
             errc::invalid_parameter);
      std::vector<int32_t> ids(R, 1);
      expect(tropd::host::sampled_rows(est::sampled<est::k1, est::as_pg_reward>{}, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(ids), {},
                                       o.lv(), o.gv(R, V), opt),
             errc::invalid_parameter);
      expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{}, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V), opt),
             errc::invalid_parameter);
    }
  }
  for (int k : {0, -3}) {
    CAPTURE(k);
    expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{k, est::topk_tail::raw}, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V)),
           errc::invalid_parameter);
  }
  expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{8, static_cast<est::topk_tail>(7)}, cm(in.z, R, V), cm(in.u, R, V), o.lv(),
                                           o.gv(R, V)),
         errc::invalid_parameter);
  std::vector<double> scale(R, 1.0);
  scale[2] = std::numeric_limits<double>::quiet_NaN();
  expect(tropd::host::divergence_rows(est::forward_kl{}, cm(in.z, R, V), cm(in.u, R, V), o.lv(), o.gv(R, V), {}, tropd::view_of(scale)),
         errc::non_finite_input, 2);
  CHECK(o.untouched());
}

TEST_CASE("bad input: sampled_rows ids, s_old and infinite log-ratios") {
  inputs in;
  const est::sampled<est::k1, est::as_pg_reward> opd;
  std::vector<int32_t> ids = {0, 5, static_cast<int32_t>(V - 1), 17};
  SUBCASE("ids outside [0, V)") {
    for (int32_t bad : {static_cast<int32_t>(V), static_cast<int32_t>(V + 5), -1, INT_MIN}) {
      CAPTURE(bad);
      std::vector<int32_t> b = ids;
      b[2] = bad;
      outs<float> o(R, V);
      expect(tropd::host::sampled_rows(opd, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(b), {}, o.lv(), o.gv(R, V)), errc::id_out_of_range, 2,
             bad);
      CHECK(o.untouched());
    }
    outs<float> o(R, V);
    std::vector<int32_t> short_ids(R - 1, 0);
    expect(tropd::host::sampled_rows(opd, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(short_ids), {}, o.lv(), o.gv(R, V)),
           errc::shape_mismatch);
    CHECK(o.untouched());
  }
  SUBCASE("s_old not finite or of the wrong size") {
    outs<float> o(R, V);
    std::vector<double> s_old(R, -1.0);
    s_old[1] = std::numeric_limits<double>::quiet_NaN();
    expect(tropd::host::sampled_rows(opd, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(ids), tropd::view_of(s_old), o.lv(), o.gv(R, V)),
           errc::non_finite_input, 1);
    s_old[1] = -dinf;
    expect(tropd::host::sampled_rows(opd, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(ids), tropd::view_of(s_old), o.lv(), o.gv(R, V)),
           errc::non_finite_input, 1);
    std::vector<double> s_short(R - 1, -1.0);
    expect(tropd::host::sampled_rows(opd, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(ids), tropd::view_of(s_short), o.lv(), o.gv(R, V)),
           errc::shape_mismatch);
    CHECK(o.untouched());
  }
  SUBCASE("-inf teacher log-prob at the sampled token: infinite divergence, named") {
    in.u[2 * V + static_cast<size_t>(ids[2])] = -finf;
    for (bool fused : {false, true}) {
      outs<float> o(R, V);
      tropd::host::row_options opt;
      opt.order = fused ? tropd::host::row_order::single_read : tropd::host::row_order::validate_first;
      const auto st = tropd::host::sampled_rows(opd, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(ids), {}, o.lv(), o.gv(R, V), opt);
      expect(st, errc::infinite_divergence, 2, ids[2]);
      CHECK(st.message().find("row 2") != std::string::npos);
      CHECK(st.message().find("column " + std::to_string(V - 1)) != std::string::npos);
      for (double l : o.loss) CHECK(l == sentinel);
      if (!fused) CHECK(o.untouched());
    }
  }
  SUBCASE("-inf student logit at the sampled token") {
    in.z[1 * V + static_cast<size_t>(ids[1])] = -finf;
    outs<float> o(R, V);
    expect(tropd::host::sampled_rows(est::sampled<est::k2, est::as_loss>{}, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(ids), {}, o.lv(),
                                     o.gv(R, V)),
           errc::infinite_divergence, 1, ids[1]);
    CHECK(o.untouched());
  }
  SUBCASE("an estimator that overflows (k3 with t - s ~ 1000)") {
    std::vector<double> z(3 * 4, 0.0), u(3 * 4, 0.0);
    z[1 * 4 + 2] = -1000.0;  // s = log p_S(2) ~ -1000 in row 1, teacher t ~ -1.4
    const std::vector<double> zc = z, uc = u;
    const std::vector<int32_t> y = {2, 2, 2};
    outs<double> o(3, 4);
    expect(tropd::host::sampled_rows(est::sampled<est::k3, est::as_loss>{}, cm(zc, 3, 4), cm(uc, 3, 4), tropd::view_of(y), {}, o.lv(),
                                     o.gv(3, 4)),
           errc::infinite_divergence, 1, 2);
    CHECK(o.untouched());
  }
  SUBCASE("-inf teacher entries elsewhere are legal") {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < V; j += 3)
        if (j != ids[static_cast<size_t>(r)]) in.u[static_cast<size_t>(r * V + j)] = -finf;
    outs<float> o(R, V);
    const auto st = tropd::host::sampled_rows(opd, cm(in.z, R, V), cm(in.u, R, V), tropd::view_of(ids), {}, o.lv(), o.gv(R, V));
    REQUIRE_MESSAGE(st.ok(), st.message());
    for (int64_t r = 0; r < R; ++r) {
      const vec z = tropd_test::row_ld(in.z, r, V), u = tropd_test::row_ld(in.u, r, V);
      const size_t y = static_cast<size_t>(ids[static_cast<size_t>(r)]);
      const auto want = naive::sampled(naive::est::k1, naive::usage::pg_reward, naive::log_softmax(z)[y], naive::log_softmax(z)[y],
                                       naive::log_softmax(u)[y]);
      CHECK(tropd_test::close_value(o.loss[static_cast<size_t>(r)], want.loss, 1e-5L));
    }
    CHECK(tropd_test::all_finite(o.grad));
  }
}

TEST_CASE("bad input: top-k lists") {
  const int64_t K = 5;
  const inputs in;
  // Valid lists: ids 10..14 with log-probs -2 .. -3 (mass < 1), row r shifted by r.
  std::vector<int32_t> ids(static_cast<size_t>(R * K));
  std::vector<float> lp(ids.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < K; ++i) {
      ids[static_cast<size_t>(r * K + i)] = static_cast<int32_t>(10 + i + r);
      lp[static_cast<size_t>(r * K + i)] = -2.0f - 0.25f * static_cast<float>(i);
    }
  auto run = [&](const std::vector<int32_t>& I, const std::vector<float>& L, outs<float>& o,
                 est::topk_tail tail = est::topk_tail::renormalised) {
    tropd::host::topk_lists tl{cm(I, R, K), cm(L, R, K)};
    return tropd::host::topk_forward_kl_rows(est::topk_forward_kl{static_cast<int>(K), tail}, cm(in.z, R, V), tl, o.lv(), o.gv(R, V));
  };
  {
    outs<float> o(R, V);
    REQUIRE(run(ids, lp, o).ok());  // the unmodified lists are valid
  }
  SUBCASE("duplicate id") {
    auto I = ids;
    I[2 * K + 3] = I[2 * K + 1];
    outs<float> o(R, V);
    expect(run(I, lp, o), errc::duplicate_topk_id, 2, 3);
    CHECK(o.untouched());
  }
  SUBCASE("repeated ids on padding entries are not duplicates") {
    auto I = ids;
    auto L = lp;
    I[1 * K + 0] = -1;
    I[1 * K + 4] = -1;
    L[1 * K + 0] = -finf;
    L[1 * K + 4] = -finf;
    outs<float> o(R, V);
    CHECK(run(I, L, o).ok());
  }
  SUBCASE("id out of range") {
    for (int32_t bad : {static_cast<int32_t>(V), -2}) {
      auto I = ids;
      I[3 * K + 4] = bad;
      outs<float> o(R, V);
      expect(run(I, lp, o), errc::id_out_of_range, 3, 4);
      CHECK(o.untouched());
    }
  }
  SUBCASE("NaN or +inf log-prob") {
    for (float bad : {fnan, finf}) {
      auto L = lp;
      L[0 * K + 2] = bad;
      outs<float> o(R, V);
      expect(run(ids, L, o), errc::non_finite_input, 0, 2);
      CHECK(o.untouched());
    }
  }
  SUBCASE("a list of padding only") {
    auto L = lp;
    for (int64_t i = 0; i < K; ++i) L[static_cast<size_t>(2 * K + i)] = -finf;
    outs<float> o(R, V);
    expect(run(ids, L, o), errc::invalid_topk_list, 2);
    CHECK(o.untouched());
  }
  SUBCASE("mass above 1 for raw and tail_bucket") {
    auto L = lp;
    L[1 * K + 0] = -0.01f;  // e^-0.01 + ... > 1
    for (auto tail : {est::topk_tail::raw, est::topk_tail::tail_bucket}) {
      outs<float> o(R, V);
      expect(run(ids, L, o, tail), errc::invalid_topk_list, 1);
      CHECK(o.untouched());
    }
  }
  SUBCASE("list shapes") {
    outs<float> o(R, V);
    tropd::host::topk_lists t1{cm(ids, R - 1, K), cm(lp, R - 1, K)};
    expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{}, cm(in.z, R, V), t1, o.lv(), o.gv(R, V)), errc::shape_mismatch);
    tropd::host::topk_lists t2{cm(ids, R, K), cm(lp, R, K - 1, K)};
    expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{}, cm(in.z, R, V), t2, o.lv(), o.gv(R, V)), errc::shape_mismatch);
    tropd::host::topk_lists t3{cm(ids, R, 0, K), cm(lp, R, 0, K)};
    expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{}, cm(in.z, R, V), t3, o.lv(), o.gv(R, V)), errc::shape_mismatch);
    tropd::host::topk_lists t4{cm(ids, R, K, K - 1), cm(lp, R, K)};
    expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{}, cm(in.z, R, V), t4, o.lv(), o.gv(R, V)), errc::shape_mismatch);
    CHECK(o.untouched());
  }
  SUBCASE("the student gives zero mass to a listed id") {
    inputs in2;
    in2.z[static_cast<size_t>(1 * V + 12)] = -finf;  // row 1 lists ids 11..15
    outs<float> o(R, V);
    tropd::host::topk_lists tl{cm(ids, R, K), cm(lp, R, K)};
    expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{static_cast<int>(K)}, cm(in2.z, R, V), tl, o.lv(), o.gv(R, V)), errc::infinite_divergence, 1);
    CHECK(o.untouched());
  }
}

TEST_CASE("bad input: top-k with full teacher logits, infinite cases") {
  const int64_t V2 = 10;
  std::vector<double> z = {0.5, 0.1, -0.3, 1.2, 0.0, -1.0, 0.7, 0.2, -0.5, 0.9};
  std::vector<double> u = {3.0, 2.5, -1.0, 0.0, -2.0, 0.3, -0.7, 1.0, -1.5, 0.1};
  SUBCASE("student -inf at a teacher top-k id") {
    auto zz = z;
    zz[1] = -dinf;  // id 1 is the teacher's second choice
    const std::vector<double> zc = zz, uc = u;
    outs<double> o(1, V2);
    expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{3, est::topk_tail::renormalised}, cm(zc, 1, V2), cm(uc, 1, V2), o.lv(),
                                             o.gv(1, V2)),
           errc::infinite_divergence, 0);
    CHECK(o.untouched());
  }
  SUBCASE("tail bucket: the student puts all its mass on the top-k, the teacher does not") {
    // The student's support is exactly the teacher's top-2 {0, 1}: its tail mass 1 - P_K is 0
    // while the teacher's is about 0.19, so the tail-bucket divergence is +inf. Several
    // student rows, because a rounded P_K may land on either side of 1.
    const int64_t rows = 8;
    std::vector<double> zz(static_cast<size_t>(rows * V2), -dinf), uu(static_cast<size_t>(rows * V2));
    for (int64_t r = 0; r < rows; ++r) {
      zz[static_cast<size_t>(r * V2 + 0)] = 0.3 + 0.11 * static_cast<double>(r);
      zz[static_cast<size_t>(r * V2 + 1)] = -0.2 - 0.07 * static_cast<double>(r);
      for (int64_t j = 0; j < V2; ++j) uu[static_cast<size_t>(r * V2 + j)] = u[static_cast<size_t>(j)];
    }
    const std::vector<double> zc = zz, uc = uu;
    for (int64_t r = 0; r < rows; ++r) {
      CAPTURE(r);
      outs<double> o(1, V2);
      expect(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{2, est::topk_tail::tail_bucket},
                                               tropd::make_matrix(zc.data() + r * V2, 1, V2), tropd::make_matrix(uc.data() + r * V2, 1, V2),
                                               o.lv(), o.gv(1, V2)),
             errc::infinite_divergence, 0);
      CHECK(o.untouched());
    }
    // The renormalised tail has no bucket: finite, and equal to the reference.
    outs<double> o2(rows, V2);
    REQUIRE(tropd::host::topk_forward_kl_rows(est::topk_forward_kl{2, est::topk_tail::renormalised}, cm(zc, rows, V2), cm(uc, rows, V2),
                                              o2.lv(), o2.gv(rows, V2))
                .ok());
    const vec lt = naive::log_softmax(tropd_test::row_ld(u, 0, V2));
    for (int64_t r = 0; r < rows; ++r) {
      const auto want = naive::topk_forward_kl(tropd_test::row_ld(zz, r, V2), {0, 1}, {lt[0], lt[1]}, naive::tail::renormalised);
      CHECK(tropd_test::close_value(o2.loss[static_cast<size_t>(r)], want.value, 1e-12L));
    }
    CHECK(tropd_test::all_finite(o2.grad));
  }
}

// ---------------------------------------------------------------------------
// -inf logits are zero mass: legal wherever the divergence stays finite.
// ---------------------------------------------------------------------------

namespace {

using naive_fn = std::function<naive::value_grad(const vec&, const vec&)>;

/// Teacher (or student) rows with -inf at every third entry; compares with the naive reference.
template <class T, class Est>
void check_neg_inf_rows(const Est& e, const naive_fn& ref, bool on_teacher) {
  std::mt19937_64 rng(52);
  const int64_t rows = 3, W = 37;
  auto z = tropd_test::random_rows<T>(rng, rows, W, 2.0), u = tropd_test::random_rows<T>(rng, rows, W, 2.0);
  auto& side = on_teacher ? u : z;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = r; j < W; j += 3) side[static_cast<size_t>(r * W + j)] = tropd_test::make<T>(-dinf);
  const std::vector<T> zc = z, uc = u;
  outs<T> o(rows, W);
  const auto st = tropd::host::divergence_rows(e, cm(zc, rows, W), cm(uc, rows, W), o.lv(), o.gv(rows, W));
  REQUIRE_MESSAGE(st.ok(), st.message());
  CHECK(tropd_test::all_finite(o.grad));
  const ld tol = std::is_same_v<T, double> ? 1e-12L : 1e-5L;
  for (int64_t r = 0; r < rows; ++r) {
    CAPTURE(r);
    const vec zl = tropd_test::row_ld(zc, r, W), ul = tropd_test::row_ld(uc, r, W);
    const auto want = ref(zl, ul);
    REQUIRE(std::isfinite(want.value));
    CHECK(tropd_test::close_value(o.loss[static_cast<size_t>(r)], want.value, tol));
    CHECK(tropd_test::grad_rel_err(o.grad.data() + r * W, want.grad) <= tol);
  }
}

template <class T>
void neg_inf_suite() {
  const naive_fn fkl = [](const vec& z, const vec& u) { return naive::forward_kl(z, u); };
  const naive_fn rkl = [](const vec& z, const vec& u) { return naive::reverse_kl(z, u); };
  const naive_fn tv = [](const vec& z, const vec& u) { return naive::total_variation(z, u); };
  SUBCASE("teacher -inf: forward KL") { check_neg_inf_rows<T>(est::forward_kl{}, fkl, true); }
  SUBCASE("teacher -inf: JSD") {
    for (double beta : {0.0, 0.1, 0.5, 0.9}) {
      CAPTURE(beta);
      check_neg_inf_rows<T>(est::jsd{beta}, naive_fn([beta](const vec& z, const vec& u) { return naive::jsd(z, u, beta); }), true);
    }
  }
  SUBCASE("teacher -inf: total variation") { check_neg_inf_rows<T>(est::total_variation{}, tv, true); }
  SUBCASE("student -inf: reverse KL") { check_neg_inf_rows<T>(est::reverse_kl{}, rkl, false); }
  SUBCASE("student -inf: JSD and TV") {
    for (double beta : {0.1, 0.5, 0.9, 1.0}) {
      CAPTURE(beta);
      check_neg_inf_rows<T>(est::jsd{beta}, naive_fn([beta](const vec& z, const vec& u) { return naive::jsd(z, u, beta); }), false);
    }
    check_neg_inf_rows<T>(est::total_variation{}, tv, false);
  }
}

}  // namespace

TEST_CASE("-inf logits are zero mass: finite divergences and gradients (fp32 rows)") { neg_inf_suite<float>(); }

TEST_CASE("-inf logits are zero mass: finite divergences and gradients (fp64 rows)") { neg_inf_suite<double>(); }
