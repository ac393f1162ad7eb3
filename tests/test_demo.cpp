// Tests of the demo's own pieces (examples/demo/): the task (worked solutions, the grader,
// the per-token classification of harmless and harmful outliers) and the window MLP's
// hand-written backpropagation and optimiser.
//
// Expected values are independent: the sequences of a worked example are computed by hand
// below; the logits of a one-unit model are written out from the definition; the gradients
// are compared with central finite differences of gradcheck.hpp's double-precision forward
// (plain loops, no code shared with mlp_lm's table-based forward); Adam's first step is its
// closed form.
#include <doctest/doctest.h>

#include <stdint.h>

#include <cmath>
#include <span>
#include <vector>

#include "../examples/demo/gradcheck.hpp"
#include "../examples/demo/mlp.hpp"
#include "../examples/demo/task.hpp"

namespace {

using demo::task_config;
using demo::token_kind;

// x0 = 123, x1 = 989 (digits least significant first); x(k+1) = x(k) + x(k-1) mod 1000:
// 112, 101, 213, 314, 527, 841.
demo::problem example() { return demo::problem{{3, 2, 1}, {9, 8, 9}}; }

}  // namespace

TEST_CASE("demo task: token ids, lengths and the prompt") {
  const task_config t{};
  CHECK(t.vocab() == 256);
  CHECK(t.first_variant() == 30);
  CHECK(t.num_variants() == 226);
  CHECK(t.response_length() == 36);
  CHECK(t.prompt_length() == 13);
  CHECK(t.natural_window() == 13);
  const std::vector<int32_t> prompt = demo::prompt_tokens(t, example());
  const std::vector<int32_t> expect = {t.bos(), 3, t.blank(), 2, t.blank(), 1, t.sep(), 9, t.blank(), 8, t.blank(), 9, t.eq()};
  CHECK(prompt == expect);
}

TEST_CASE("demo task: the worked solution of a hand-computed example") {
  const task_config t{};
  const auto xs = demo::true_numbers(t, example());
  const std::vector<std::vector<int>> expect = {{2, 1, 1}, {1, 0, 1}, {3, 1, 2}, {4, 1, 3}, {7, 2, 5}, {1, 4, 8}};
  CHECK(xs == expect);
  const std::vector<int32_t> sol = demo::correct_solution(t, example());
  REQUIRE(sol.size() == 36u);
  // 3 + 9 = 12: digit 2, carry 1; 2 + 8 + 1 = 11: digit 1, carry 1; 1 + 9 + 1 = 11: digit 1.
  const std::vector<int32_t> first = {2, t.c1(), 1, t.c1(), 1, t.sep()};
  CHECK(std::vector<int32_t>(sol.begin(), sol.begin() + 6) == first);
  // 112 + 989: 2 + 9 = 11 -> 1 carry 1; 1 + 8 + 1 = 10 -> 0 carry 1; 1 + 9 + 1 = 11 -> 1.
  const std::vector<int32_t> second = {1, t.c1(), 0, t.c1(), 1, t.sep()};
  CHECK(std::vector<int32_t>(sol.begin() + 6, sol.begin() + 12) == second);
  CHECK(sol.back() == t.eos());
  CHECK(sol[35 - 5] == 1);  // last number 841: digits 1, 4, 8
  CHECK(sol[35 - 3] == 4);
  CHECK(sol[35 - 1] == 8);
  CHECK(demo::verify(t, example(), sol));
  for (int j = 0; j < 36; ++j) CHECK(demo::classify(t, example(), sol, j) == token_kind::canonical);
}

TEST_CASE("demo task: surface variants are accepted and classified harmless") {
  const task_config t{};
  demo::rng r(1);
  const demo::style st{true, true, t.first_variant() + 17};
  const std::vector<int32_t> sol = demo::solution(t, example(), st, 0.0, r);
  const std::vector<int32_t> first = {t.alt_digit(2), t.alt_c1(), t.alt_digit(1), t.alt_c1(), t.alt_digit(1), 47};
  CHECK(std::vector<int32_t>(sol.begin(), sol.begin() + 6) == first);
  CHECK(demo::verify(t, example(), sol));
  for (int j = 0; j + 1 < 36; ++j) CHECK(demo::classify(t, example(), sol, j) == token_kind::variant);
  CHECK(demo::classify(t, example(), sol, 35) == token_kind::canonical);  // EOS
  // Mixed: one variant separator in an otherwise canonical solution.
  std::vector<int32_t> mixed = demo::correct_solution(t, example());
  mixed[11] = t.vocab() - 1;
  CHECK(demo::verify(t, example(), mixed));
  CHECK(demo::classify(t, example(), mixed, 11) == token_kind::variant);
  CHECK(demo::classify(t, example(), mixed, 12) == token_kind::canonical);
  CHECK(t.surface_base(t.alt_digit(7)) == 7);
  CHECK(t.surface_base(t.alt_c0()) == t.c0());
  CHECK(t.surface_base(200) == t.sep());
  CHECK(t.surface_base(t.eos()) == t.eos());
}

TEST_CASE("demo task: a dropped carry is an error, the consistent tokens after it are not") {
  const task_config t{};
  std::vector<int32_t> sol = demo::correct_solution(t, example());
  // Drop the first carry (3 + 9 = 12): write C0 and then 2 + 8 + 0 = 10 -> digit 0, carry 1.
  sol[1] = t.c0();
  sol[2] = 0;
  CHECK(demo::classify(t, example(), sol, 1) == token_kind::error);
  CHECK(demo::classify(t, example(), sol, 2) == token_kind::canonical);  // right given the written C0
  CHECK(demo::classify(t, example(), sol, 3) == token_kind::canonical);  // carry of 2 + 8 + 0 = 10 is 1
  CHECK(demo::classify(t, example(), sol, 4) == token_kind::canonical);  // 1 + 9 + 1 = 11 -> 1
  // The rest was computed from 112, so the next number is wrong given the written 102.
  CHECK(demo::classify(t, example(), sol, 6) == token_kind::canonical);  // 2 + 9 = 11 -> 1 either way
  CHECK(demo::classify(t, example(), sol, 8) == token_kind::error);      // 0 + 8 + 1 = 9, written 0
  CHECK(demo::verify(t, example(), sol));  // the grader reads the answer only (the last number, 841 here)
  // Every carry dropped, and the rest computed from the numbers as written: 3 + 9 = 12 -> 2,
  // 2 + 8 = 10 -> 0, 1 + 9 = 10 -> 0: x2 = 002; the answer is wrong.
  demo::rng r0(0);
  const std::vector<int32_t> dropped = demo::solution(t, example(), demo::style{}, 1.0, r0);
  const std::vector<int32_t> first = {2, t.c0(), 0, t.c0(), 0, t.sep()};
  CHECK(std::vector<int32_t>(dropped.begin(), dropped.begin() + 6) == first);
  CHECK_FALSE(demo::verify(t, example(), dropped));
  // The generator's dropped carries follow the same rule: every error is a C0 written for a 1.
  demo::rng r(5);
  int errors = 0;
  for (int k = 0; k < 200; ++k) {
    const std::vector<int32_t> s = demo::solution(t, example(), demo::style{}, 0.5, r);
    for (int j = 0; j < 36; ++j)
      if (demo::classify(t, example(), s, j) == token_kind::error) {
        CHECK(s[size_t(j)] == t.c0());
        ++errors;
      }
  }
  CHECK(errors > 100);
}

TEST_CASE("demo task: the grader rejects wrong shapes and answers") {
  const task_config t{};
  const std::vector<int32_t> sol = demo::correct_solution(t, example());
  std::vector<int32_t> bad = sol;
  bad[5] = 3;  // a digit in a separator slot
  CHECK_FALSE(demo::verify(t, example(), bad));
  CHECK(demo::classify(t, example(), bad, 5) == token_kind::error);
  bad = sol;
  bad[1] = t.sep();  // a separator in a carry slot
  CHECK_FALSE(demo::verify(t, example(), bad));
  bad = sol;
  bad[34] = 9;  // last digit of the answer
  CHECK_FALSE(demo::verify(t, example(), bad));
  CHECK(demo::classify(t, example(), bad, 34) == token_kind::error);
  bad = sol;
  bad.pop_back();
  CHECK_FALSE(demo::verify(t, example(), bad));
  bad = sol;
  bad.push_back(t.eos());
  CHECK_FALSE(demo::verify(t, example(), bad));
  CHECK(demo::classify(t, example(), bad, 36) == token_kind::error);
}

TEST_CASE("demo model: logits of a one-unit model from the definition") {
  // V = 3, W = 1, d = 1, H = 1: a = b1 + P[pos] + E[prev] W1, z_v = tanh(a) W2[v] + b2[v].
  demo::mlp_config c{3, 1, 1, 1, 2, 0, -1};
  demo::mlp_lm m(c, 7);
  const demo::mlp_layout l = m.layout();
  CHECK(l.total == 3 + 1 + 1 + 2 + 3 + 3);
  auto th = m.parameters();
  const float E[3] = {0.5f, -1.0f, 2.0f}, W2[3] = {1.0f, -2.0f, 0.25f}, b2[3] = {0.1f, 0.0f, -0.3f};
  for (int v = 0; v < 3; ++v) {
    th[l.E + size_t(v)] = E[v];
    th[l.W2 + size_t(v)] = W2[v];
    th[l.b2 + size_t(v)] = b2[v];
  }
  th[l.W1] = 0.75f;
  th[l.b1] = -0.2f;
  th[l.P] = 0.3f;
  th[l.P + 1] = -0.1f;
  m.touched();
  const std::vector<int32_t> tokens = {1, 2, 0};
  const std::vector<tropd::index_t> offsets = {0, 3};
  std::vector<float> z(9);
  REQUIRE(m.logits(tropd::runtime::sequence_batch{tokens, offsets}, tropd::make_matrix(z.data(), 3, 3)).ok());
  // Row 0: context PAD (= token 0), position 0; row 1: token 1, position 1; row 2: token 2,
  // position 1 (the last position row is shared).
  const double a[3] = {-0.2 + 0.3 + 0.5 * 0.75, -0.2 - 0.1 - 1.0 * 0.75, -0.2 - 0.1 + 2.0 * 0.75};
  for (int i = 0; i < 3; ++i)
    for (int v = 0; v < 3; ++v) CHECK(z[size_t(i * 3 + v)] == doctest::Approx(std::tanh(a[i]) * W2[v] + b2[v]).epsilon(1e-6));
  // Greedy sampling takes the argmax: from context {1} (position 1), a = -1.05 and
  // z = (-0.68, 1.56, -0.50) -> token 1.
  const std::vector<int32_t> ctx = {1};
  const std::vector<int32_t> g = m.sample(ctx, 1, 0.0, 0);
  REQUIRE(g.size() == 1u);
  CHECK(g[0] == 1);
}

TEST_CASE("demo model: backward pass against finite differences of an independent forward") {
  demo::mlp_config c{40, 5, 4, 8, 12, 39, -1};
  demo::mlp_lm m(c, 11);
  demo::rng r(3);
  std::vector<int32_t> tokens;
  std::vector<tropd::index_t> offsets{0};
  for (int s = 0; s < 3; ++s) {
    for (int i = 0; i < 9 + 2 * s; ++i) tokens.push_back(r.below(40));
    offsets.push_back(static_cast<tropd::index_t>(tokens.size()));  // the third sequence (13 rows) shares position rows
  }
  const demo::gradcheck_result res = demo::check_gradients(m, tokens, offsets, 17, 40);
  CHECK(res.entries == 240);
  CHECK(res.logit_error < 1e-5);
  CHECK(res.gradient_error < 1e-4);
  CHECK(res.max_gradient > 0.1);  // not a vacuous comparison
  // The same after some Adam steps (non-trivial parameters, the table rebuilt).
  std::vector<float> G(tokens.size() * 40);
  for (int step = 0; step < 5; ++step) {
    for (float& x : G) x = float(r.uniform() - 0.5);
    std::vector<float> z(G.size());
    tropd::runtime::sequence_batch b{tokens, offsets};
    m.zero_grad();
    REQUIRE(m.logits(b, tropd::make_matrix(z.data(), tropd::index_t(tokens.size()), 40)).ok());
    REQUIRE(m.backward_logits(b, tropd::make_matrix<const float>(G.data(), tropd::index_t(tokens.size()), 40)).ok());
    m.adam_step(0.05);
  }
  const demo::gradcheck_result res2 = demo::check_gradients(m, tokens, offsets, 19, 40);
  CHECK(res2.logit_error < 1e-5);
  CHECK(res2.gradient_error < 1e-4);
}

TEST_CASE("demo model: Adam's first step is lr * g / (|g| + eps) per parameter") {
  demo::mlp_config c{6, 2, 2, 3, 4, 5, -1};
  demo::mlp_lm m(c, 2);
  const std::vector<float> before(m.parameters().begin(), m.parameters().end());
  const std::vector<int32_t> tokens = {1, 2, 3, 4};
  const std::vector<tropd::index_t> offsets = {0, 4};
  std::vector<float> z(24), G(24);
  for (size_t i = 0; i < G.size(); ++i) G[i] = float(i % 5) - 2.0f;
  tropd::runtime::sequence_batch b{tokens, offsets};
  m.zero_grad();
  REQUIRE(m.logits(b, tropd::make_matrix(z.data(), 4, 6)).ok());
  REQUIRE(m.backward_logits(b, tropd::make_matrix<const float>(G.data(), 4, 6)).ok());
  const std::vector<float> g(m.gradient().begin(), m.gradient().end());
  m.adam_step(0.01);
  for (size_t i = 0; i < g.size(); ++i) {
    const double expect = before[i] - 0.01 * double(g[i]) / (std::abs(double(g[i])) + 1e-8);
    CHECK(m.parameters()[i] == doctest::Approx(expect).epsilon(1e-5));
  }
}

TEST_CASE("demo model: sampling is a function of the seed") {
  demo::mlp_config c{20, 3, 4, 8, 16, 0, 19};
  demo::mlp_lm m(c, 4);
  const std::vector<int32_t> ctx = {1, 2, 3};
  CHECK(m.sample(ctx, 10, 1.0, 99) == m.sample(ctx, 10, 1.0, 99));
  demo::mlp_lm copy = m;
  CHECK(copy.sample(ctx, 10, 1.0, 99) == m.sample(ctx, 10, 1.0, 99));
  int differ = 0;
  for (uint64_t s = 0; s < 20; ++s) differ += m.sample(ctx, 10, 1.0, s) != m.sample(ctx, 10, 1.0, 99) ? 1 : 0;
  CHECK(differ > 10);
}
