// task.hpp: the synthetic task, multi-digit addition with a carry scratchpad.
//
// A problem is two n-digit numbers a, b in base B. Digits are written least significant
// first and interleaved, so that every step of the computation finds its operands at a
// fixed distance back (a language model that sees the previous W = 2n + 2 tokens can
// solve it):
//
//   prompt    BOS a0 b0 a1 b1 ... a(n-1) b(n-1) =
//   response  s0 C(c1) s1 C(c2) ... s(n-1) C(cn) EOS          (format A: the teacher's)
//
// with s_i = (a_i + b_i + c_i) mod B, c_(i+1) = (a_i + b_i + c_i) div B, c_0 = 0, and C(0), C(1)
// two dedicated carry tokens. The answer a + b is (s0 .. s(n-1), cn): n + 1 digits.
//
// The student's supervised start comes from a different, noisier source ("mismatch" m):
//   - format B: with probability m a solution writes its carries as the plain digits 0 / 1
//     instead of the carry tokens (a different reasoning format);
//   - noise: each carry of 1 is forgotten (written and used as 0) with probability m / 2,
//     so such a solution is consistently wrong from there on.
// A teacher trained on format A gives the format-B carry digits and the forgotten carries
// almost no probability: these are the tokens with R = log p_T - log p_S << 0.
//
// Verification (pass@1): the response must have the shape s0 c s1 c ... s(n-1) c EOS with
// every c a carry token or the digit 0 / 1 (either format is accepted), and its answer
// digits (s0 .. s(n-1), value of the last c) must equal a + b. Vocabulary: the B digits
// plus PAD, BOS, =, C0, C1, EOS (V = B + 6; 16 for base 10).
#pragma once

#include <stdint.h>

#include <set>
#include <vector>

#include "rng.hpp"

namespace demo {

struct task_config {
  int digits = 3;  ///< n, digits per operand (difficulty: length)
  int base = 10;   ///< B (difficulty: vocabulary); V = B + 6

  int pad() const { return base; }
  int bos() const { return base + 1; }
  int eq() const { return base + 2; }
  int c0() const { return base + 3; }
  int c1() const { return base + 4; }
  int eos() const { return base + 5; }
  int vocab() const { return base + 6; }
  int prompt_length() const { return 2 * digits + 2; }
  int response_length() const { return 2 * digits + 1; }  ///< with its EOS
  /// The context window that makes the task solvable by a window model.
  int natural_window() const { return 2 * digits + 2; }
};

/// One addition problem; digits least significant first.
struct problem {
  std::vector<int> a, b;
  bool operator<(const problem& o) const { return a != o.a ? a < o.a : b < o.b; }
};

inline problem random_problem(const task_config& t, rng& r) {
  problem p;
  p.a.resize(static_cast<size_t>(t.digits));
  p.b.resize(static_cast<size_t>(t.digits));
  for (int i = 0; i < t.digits; ++i) {
    p.a[static_cast<size_t>(i)] = r.below(t.base);
    p.b[static_cast<size_t>(i)] = r.below(t.base);
  }
  return p;
}

inline std::vector<int32_t> prompt_tokens(const task_config& t, const problem& p) {
  std::vector<int32_t> out{t.bos()};
  for (int i = 0; i < t.digits; ++i) {
    out.push_back(p.a[static_cast<size_t>(i)]);
    out.push_back(p.b[static_cast<size_t>(i)]);
  }
  out.push_back(t.eq());
  return out;
}

/// The n + 1 digits of a + b (least significant first; the last one is the final carry).
inline std::vector<int> true_answer(const task_config& t, const problem& p) {
  std::vector<int> s;
  int c = 0;
  for (int i = 0; i < t.digits; ++i) {
    const int v = p.a[static_cast<size_t>(i)] + p.b[static_cast<size_t>(i)] + c;
    s.push_back(v % t.base);
    c = v / t.base;
  }
  s.push_back(c);
  return s;
}

/// A worked solution (response tokens ending with EOS).
///   carry_as_digit: format B (carries written as the digits 0 / 1)
///   forget_prob:    probability of forgetting each carry of 1 (noisy source)
inline std::vector<int32_t> solution(const task_config& t, const problem& p, bool carry_as_digit, double forget_prob,
                                     rng& r) {
  std::vector<int32_t> out;
  int c = 0;
  for (int i = 0; i < t.digits; ++i) {
    const int v = p.a[static_cast<size_t>(i)] + p.b[static_cast<size_t>(i)] + c;
    out.push_back(v % t.base);
    c = v / t.base;
    if (c == 1 && forget_prob > 0 && r.bernoulli(forget_prob)) c = 0;
    out.push_back(carry_as_digit ? c : (c ? t.c1() : t.c0()));
  }
  out.push_back(t.eos());
  return out;
}

/// The correct format-A solution.
inline std::vector<int32_t> correct_solution(const task_config& t, const problem& p) {
  rng unused(0);
  return solution(t, p, false, 0.0, unused);
}

/// The student's supervised source at mismatch level m (see the header comment).
inline std::vector<int32_t> student_source_solution(const task_config& t, const problem& p, double mismatch, rng& r) {
  const bool fmt_b = r.bernoulli(mismatch);
  return solution(t, p, fmt_b, 0.5 * mismatch, r);
}

/// Carry value of a carry-position token (either format), or -1.
inline int carry_value(const task_config& t, int32_t tok) {
  if (tok == t.c0() || tok == 0) return 0;
  if (tok == t.c1() || tok == 1) return 1;
  return -1;
}

/// pass@1 check of a response (tokens after the prompt).
inline bool verify(const task_config& t, const problem& p, const std::vector<int32_t>& response) {
  if (static_cast<int>(response.size()) != t.response_length() || response.back() != t.eos()) return false;
  const std::vector<int> ans = true_answer(t, p);
  for (int i = 0; i < t.digits; ++i) {
    if (response[static_cast<size_t>(2 * i)] != ans[static_cast<size_t>(i)]) return false;
    const int c = carry_value(t, response[static_cast<size_t>(2 * i + 1)]);
    if (c < 0) return false;
    if (i == t.digits - 1 && c != ans[static_cast<size_t>(t.digits)]) return false;
  }
  return true;
}

/// `count` distinct random problems not in `exclude` (and added to it when `reserve`).
inline std::vector<problem> distinct_problems(const task_config& t, int count, rng& r, std::set<problem>& exclude,
                                              bool reserve) {
  std::vector<problem> out;
  std::set<problem> local;
  int tries = 0;
  while (static_cast<int>(out.size()) < count) {
    problem p = random_problem(t, r);
    if (exclude.count(p) || (reserve && local.count(p))) {
      if (++tries > 1000 * count) break;  // tiny problem spaces: take what there is
      continue;
    }
    if (reserve) local.insert(p);
    out.push_back(std::move(p));
  }
  if (reserve) exclude.insert(local.begin(), local.end());
  return out;
}

}  // namespace demo
