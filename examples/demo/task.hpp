// task.hpp: the synthetic task, a multi-step recurrence (x_(k+1) = x_k + x_(k-1) mod B^D)
// worked digit by digit with a carry scratchpad, in a vocabulary with many surface forms.
//
// A problem is two D-digit numbers x0, x1 in base B (default D = 3, B = 10). The response
// computes the next K numbers (default 6) of the sequence x_(k+1) = (x_k + x_(k-1)) mod B^D.
// Every number is a block of 2D tokens, digits least significant first, with the carry into
// each digit written before it:
//
//   prompt    BOS [x0: d0 _ d1 _ d2 ,] [x1: d0 _ d1 _ d2 =]                    (13 tokens)
//   response  [x2: d0 C(c1) d1 C(c2) d2 ,] ... [x7: d0 C(c1) d1 C(c2) d2 EOS]  (36 tokens)
//
// with d_j = (a_j + b_j + c_j) mod B, c_(j+1) = (a_j + b_j + c_j) div B, c_0 = 0 (a, b: the two
// numbers before; the carry out of the top digit is dropped, hence mod B^D). Each token finds
// its operands at a fixed distance back (2 blocks = 4D tokens, plus one for a carry), so a
// model that sees the previous W = 4D + 1 tokens and knows its position can solve the task.
//
// Vocabulary (V = 256 by default; base 10):
//   0..9 digits, 10..19 alternative digits (another notation of the same values),
//   20 C0, 21 C1 (carry tokens), 22 +0, 23 +1 (alternative carry notation),
//   24 ',' (separator), 25 '=', 26 BOS, 27 EOS, 28 PAD, 29 '_' (blank carry slot of the prompt),
//   30..255 separator variants (226 filler / format tokens: other punctuation, words, spaces).
//
// Grader (pass@1): the response must have the block shape (a digit of either notation in
// every digit slot, a carry of either notation in every carry slot, any separator in every
// separator slot, EOS at the end) and its last number must equal x_(K+1). The grader thus
// accepts every surface form; the teacher never writes any but the canonical one.
//
// The two models learn from different sources:
//   - the teacher from correct canonical solutions; half of its training contexts are
//     rewritten in other surface forms while its targets stay canonical, so it reads every
//     notation but writes only one (a teacher with its own style);
//   - the student from a noisier source: each solution independently uses one separator
//     variant throughout (probability h), the alternative carry notation (h / 2), the
//     alternative digit notation (h / 4) -- harmless, the grader accepts them -- and drops
//     each carry of 1 with probability e (written as 0 and not added: a real error, and the
//     rest of the solution is computed from the wrong number).
// The teacher gives the harmless variants almost no mass, so they are outliers (R << 0) just
// like the real errors: the two kinds of outlier of the paper ("formatting, tokenisation,
// style" versus wrong reasoning). classify() tells them apart token by token.
#pragma once

#include <stdint.h>

#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "rng.hpp"

namespace demo {

struct task_config {
  int base = 10;         ///< B
  int digits = 3;        ///< D, digits per number
  int numbers = 6;       ///< K, numbers the response computes
  int vocab_size = 256;  ///< V; every id from first_variant() up is a separator variant

  // Token ids.
  int digit(int v) const { return v; }
  int alt_digit(int v) const { return base + v; }
  int c0() const { return 2 * base; }
  int c1() const { return 2 * base + 1; }
  int alt_c0() const { return 2 * base + 2; }
  int alt_c1() const { return 2 * base + 3; }
  int sep() const { return 2 * base + 4; }
  int eq() const { return 2 * base + 5; }
  int bos() const { return 2 * base + 6; }
  int eos() const { return 2 * base + 7; }
  int pad() const { return 2 * base + 8; }
  int blank() const { return 2 * base + 9; }
  int first_variant() const { return 2 * base + 10; }
  int num_variants() const { return vocab_size - first_variant(); }
  int vocab() const { return vocab_size; }

  int block_length() const { return 2 * digits; }
  int prompt_length() const { return 1 + 2 * block_length(); }
  int response_length() const { return numbers * block_length(); }  ///< with its EOS
  /// The context window that makes the task solvable by a window model (with positions).
  int natural_window() const { return 2 * block_length() + 1; }
  /// Longest sequence the models must place (prompt + response + the sampling slack).
  int max_sequence() const { return prompt_length() + response_length() + 2; }

  void validate() const {
    if (base < 2 || digits < 1 || numbers < 1) throw std::runtime_error("task: need base >= 2, digits >= 1, numbers >= 1");
    if (num_variants() < 1) throw std::runtime_error("task: vocabulary too small for one separator variant");
  }

  // Decoding (-1: not of that class).
  int digit_value(int32_t tok) const {
    if (tok >= 0 && tok < base) return tok;
    if (tok >= base && tok < 2 * base) return tok - base;
    return -1;
  }
  int carry_value(int32_t tok) const {
    if (tok == c0() || tok == alt_c0()) return 0;
    if (tok == c1() || tok == alt_c1()) return 1;
    return -1;
  }
  /// The canonical token a surface variant stands for (the token itself otherwise).
  int32_t surface_base(int32_t tok) const {
    if (tok >= base && tok < 2 * base) return tok - base;
    if (tok == alt_c0()) return c0();
    if (tok == alt_c1()) return c1();
    if (tok >= first_variant() && tok < vocab_size) return sep();
    return tok;
  }
  bool is_separator(int32_t tok) const { return tok == sep() || (tok >= first_variant() && tok < vocab_size); }
  /// A surface form other than the canonical one (alternative digit or carry, separator variant).
  bool is_variant(int32_t tok) const {
    return (tok >= base && tok < 2 * base) || tok == alt_c0() || tok == alt_c1() || (tok >= first_variant() && tok < vocab_size);
  }
};

/// One problem: the two starting numbers, digits least significant first.
struct problem {
  std::vector<int> x0, x1;
  bool operator<(const problem& o) const { return x0 != o.x0 ? x0 < o.x0 : x1 < o.x1; }
};

inline problem random_problem(const task_config& t, rng& r) {
  problem p;
  for (int i = 0; i < t.digits; ++i) p.x0.push_back(r.below(t.base));
  for (int i = 0; i < t.digits; ++i) p.x1.push_back(r.below(t.base));
  return p;
}

inline std::vector<int32_t> prompt_tokens(const task_config& t, const problem& p) {
  std::vector<int32_t> out{t.bos()};
  for (int k = 0; k < 2; ++k) {
    const auto& x = k == 0 ? p.x0 : p.x1;
    for (int j = 0; j < t.digits; ++j) {
      if (j > 0) out.push_back(t.blank());
      out.push_back(x[size_t(j)]);
    }
    out.push_back(k == 0 ? t.sep() : t.eq());
  }
  return out;
}

/// The K numbers the response must compute (exact arithmetic).
inline std::vector<std::vector<int>> true_numbers(const task_config& t, const problem& p) {
  std::vector<std::vector<int>> xs{p.x0, p.x1};
  for (int k = 0; k < t.numbers; ++k) {
    const auto &a = xs[xs.size() - 1], &b = xs[xs.size() - 2];
    std::vector<int> x(size_t(t.digits));
    int c = 0;
    for (int j = 0; j < t.digits; ++j) {
      const int v = a[size_t(j)] + b[size_t(j)] + c;
      x[size_t(j)] = v % t.base;
      c = v / t.base;
    }
    xs.push_back(std::move(x));
  }
  return {xs.begin() + 2, xs.end()};
}

/// How a solution is written.
struct style {
  bool alt_digits = false;  ///< digits in the alternative notation
  bool alt_carries = false; ///< carries as +0 / +1
  int32_t separator = -1;   ///< separator token (-1: the canonical ',')
};

/// A worked solution (response tokens ending with EOS) in style `st`; each carry of 1 is
/// dropped with probability `drop` (written as 0 and not added; later numbers are computed
/// from the numbers as written).
inline std::vector<int32_t> solution(const task_config& t, const problem& p, const style& st, double drop, rng& r) {
  std::vector<int32_t> out;
  std::vector<int> b = p.x0, a = p.x1;
  for (int k = 0; k < t.numbers; ++k) {
    std::vector<int> x(size_t(t.digits));
    int c = 0;
    for (int j = 0; j < t.digits; ++j) {
      if (j > 0) {
        if (c == 1 && drop > 0 && r.bernoulli(drop)) c = 0;
        out.push_back(st.alt_carries ? (c ? t.alt_c1() : t.alt_c0()) : (c ? t.c1() : t.c0()));
      }
      const int v = a[size_t(j)] + b[size_t(j)] + c;
      x[size_t(j)] = v % t.base;
      c = v / t.base;
      out.push_back(st.alt_digits ? t.alt_digit(x[size_t(j)]) : t.digit(x[size_t(j)]));
    }
    out.push_back(k + 1 == t.numbers ? t.eos() : (st.separator >= 0 ? st.separator : t.sep()));
    b = std::move(a);
    a = std::move(x);
  }
  return out;
}

/// The correct canonical solution (the teacher's source).
inline std::vector<int32_t> correct_solution(const task_config& t, const problem& p) {
  rng unused(0);
  return solution(t, p, style{}, 0.0, unused);
}

/// A random surface style: separator variant with probability ps, alternative carries pc,
/// alternative digits pd (independently).
inline style random_style(const task_config& t, double ps, double pc, double pd, rng& r) {
  style st;
  if (r.bernoulli(ps)) st.separator = t.first_variant() + r.below(t.num_variants());
  st.alt_carries = r.bernoulli(pc);
  st.alt_digits = r.bernoulli(pd);
  return st;
}

/// The student's supervised source: harmless style rate h, harmful error rate e.
inline std::vector<int32_t> student_source_solution(const task_config& t, const problem& p, double h, double e, rng& r) {
  const style st = random_style(t, h, h / 2, h / 4, r);
  return solution(t, p, st, e, r);
}

/// pass@1 check of a response (tokens after the prompt).
inline bool verify(const task_config& t, const problem& p, const std::vector<int32_t>& response) {
  if (static_cast<int>(response.size()) != t.response_length() || response.back() != t.eos()) return false;
  const int L = t.block_length();
  for (int k = 0; k < t.numbers; ++k)
    for (int s = 0; s < L; ++s) {
      const int32_t tok = response[size_t(k * L + s)];
      if (s == L - 1) {
        if (k + 1 < t.numbers && !t.is_separator(tok)) return false;
      } else if (s % 2 == 0) {
        if (t.digit_value(tok) < 0) return false;
      } else if (t.carry_value(tok) < 0) {
        return false;
      }
    }
  const auto last = true_numbers(t, p).back();
  for (int j = 0; j < t.digits; ++j)
    if (t.digit_value(response[size_t((t.numbers - 1) * L + 2 * j)]) != last[size_t(j)]) return false;
  return true;
}

/// What a response token is, judged from the tokens before it (the prompt and the response
/// so far): the value the correct reasoning gives at that point from what is written (the
/// two numbers before, as written, and the carry just written).
enum class token_kind : int {
  canonical = 0,  ///< right value (or right class where the context gives no value), canonical form
  variant = 1,    ///< right value in a surface form the grader accepts (harmless)
  error = 2,      ///< wrong value, wrong class for the slot, or beyond the response (harmful)
};

inline token_kind classify(const task_config& t, const problem& p, const std::vector<int32_t>& response, int j) {
  const int32_t y = response[size_t(j)];
  if (j >= t.response_length()) return token_kind::error;
  const int L = t.block_length(), k = j / L, s = j % L;
  auto form = [&] { return t.is_variant(y) ? token_kind::variant : token_kind::canonical; };
  if (s == L - 1) {
    if (k + 1 == t.numbers) return y == t.eos() ? token_kind::canonical : token_kind::error;
    return t.is_separator(y) ? form() : token_kind::error;
  }
  // Digit i of the number before (back = 1) or two before (back = 2), as written; -1 if unreadable.
  auto written = [&](int back, int i) -> int {
    const int kk = k - back;  // block index; -1: x1 (prompt), -2: x0 (prompt)
    if (kk == -1) return p.x1[size_t(i)];
    if (kk == -2) return p.x0[size_t(i)];
    return t.digit_value(response[size_t(kk * L + 2 * i)]);
  };
  const int i = s / 2;  // digit slot i (s = 2i) or the carry into digit i + 1 (s = 2i + 1)
  int c = 0;            // carry into digit i as written
  if (i > 0) c = t.carry_value(response[size_t(k * L + 2 * i - 1)]);
  const int a = written(1, i), b = written(2, i);
  const bool known = a >= 0 && b >= 0 && c >= 0;
  if (s % 2 == 0) {
    const int v = t.digit_value(y);
    if (v < 0) return token_kind::error;
    if (known && v != (a + b + c) % t.base) return token_kind::error;
    return form();
  }
  const int v = t.carry_value(y);
  if (v < 0) return token_kind::error;
  if (known && v != (a + b + c) / t.base) return token_kind::error;
  return form();
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
