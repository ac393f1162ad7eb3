"""The demo's synthetic task in Python: a transcription of examples/demo/task.hpp.

A problem is two D-digit numbers x0, x1 in base B (default D = 3, B = 10). The response
computes the next K numbers (default 6) of x(k+1) = (x(k) + x(k-1)) mod B^D, digit by digit,
least significant digit first, with the carry into each digit written before it:

    prompt    BOS [x0: d0 _ d1 _ d2 ,] [x1: d0 _ d1 _ d2 =]                    (13 tokens)
    response  [x2: d0 C(c1) d1 C(c2) d2 ,] ... [x7: d0 C(c1) d1 C(c2) d2 EOS]  (36 tokens)

Vocabulary (V = 256, base 10), the same ids as the C++ demo:
    0..9 digits, 10..19 alternative digits, 20 C0, 21 C1, 22 +0, 23 +1 (alternative carries),
    24 ',' (separator), 25 '=', 26 BOS, 27 EOS, 28 PAD, 29 '_' (the prompt's blank carry slot),
    30..255 separator variants.

Grader (pass@1, `verify`): the block shape (a digit of either notation in each digit slot, a
carry of either notation in each carry slot, any separator in each separator slot, EOS at the
end) and the last number equal to x(K+1). It accepts every surface form.

`classify` tells the kinds of token apart (canonical, harmless surface variant, harmful error),
judging each token from the tokens before it, as task.hpp's classify() does.

The random streams are numpy's (numpy.random.Generator), not the C++ demo's rng.hpp: the same
distributions, not the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANONICAL, VARIANT, ERROR = 0, 1, 2  # classify()'s answers


@dataclass(frozen=True)
class TaskConfig:
    base: int = 10  # B
    digits: int = 3  # D, digits per number
    numbers: int = 6  # K, numbers the response computes
    vocab_size: int = 256  # every id from first_variant up is a separator variant

    # Token ids.
    def digit(self, v: int) -> int:
        return v

    def alt_digit(self, v: int) -> int:
        return self.base + v

    @property
    def c0(self) -> int:
        return 2 * self.base

    @property
    def c1(self) -> int:
        return 2 * self.base + 1

    @property
    def alt_c0(self) -> int:
        return 2 * self.base + 2

    @property
    def alt_c1(self) -> int:
        return 2 * self.base + 3

    @property
    def sep(self) -> int:
        return 2 * self.base + 4

    @property
    def eq(self) -> int:
        return 2 * self.base + 5

    @property
    def bos(self) -> int:
        return 2 * self.base + 6

    @property
    def eos(self) -> int:
        return 2 * self.base + 7

    @property
    def pad(self) -> int:
        return 2 * self.base + 8

    @property
    def blank(self) -> int:
        return 2 * self.base + 9

    @property
    def first_variant(self) -> int:
        return 2 * self.base + 10

    @property
    def num_variants(self) -> int:
        return self.vocab_size - self.first_variant

    @property
    def block_length(self) -> int:
        return 2 * self.digits

    @property
    def prompt_length(self) -> int:
        return 1 + 2 * self.block_length

    @property
    def response_length(self) -> int:  # with its EOS
        return self.numbers * self.block_length

    @property
    def max_new_tokens(self) -> int:  # the sampling budget (the C++ demo's response_length + 2)
        return self.response_length + 2

    @property
    def max_sequence(self) -> int:
        return self.prompt_length + self.max_new_tokens

    def validate(self) -> None:
        if self.base < 2 or self.digits < 1 or self.numbers < 1:
            raise ValueError("task: need base >= 2, digits >= 1, numbers >= 1")
        if self.num_variants < 1:
            raise ValueError("task: vocabulary too small for one separator variant")

    # Decoding (-1: not of that class).
    def digit_value(self, tok: int) -> int:
        if 0 <= tok < self.base:
            return tok
        if self.base <= tok < 2 * self.base:
            return tok - self.base
        return -1

    def carry_value(self, tok: int) -> int:
        if tok in (self.c0, self.alt_c0):
            return 0
        if tok in (self.c1, self.alt_c1):
            return 1
        return -1

    def surface_base(self, tok: int) -> int:
        """The canonical token a surface variant stands for (the token itself otherwise)."""
        if self.base <= tok < 2 * self.base:
            return tok - self.base
        if tok == self.alt_c0:
            return self.c0
        if tok == self.alt_c1:
            return self.c1
        if self.first_variant <= tok < self.vocab_size:
            return self.sep
        return tok

    def is_separator(self, tok: int) -> bool:
        return tok == self.sep or self.first_variant <= tok < self.vocab_size

    def is_variant(self, tok: int) -> bool:
        return (
            self.base <= tok < 2 * self.base
            or tok in (self.alt_c0, self.alt_c1)
            or self.first_variant <= tok < self.vocab_size
        )


@dataclass(frozen=True)
class Problem:
    x0: tuple[int, ...]  # digits, least significant first
    x1: tuple[int, ...]


@dataclass(frozen=True)
class Style:
    alt_digits: bool = False
    alt_carries: bool = False
    separator: int = -1  # -1: the canonical ','


def random_problem(t: TaskConfig, rng: np.random.Generator) -> Problem:
    x = rng.integers(0, t.base, size=2 * t.digits)
    return Problem(tuple(int(v) for v in x[: t.digits]), tuple(int(v) for v in x[t.digits :]))


def prompt_tokens(t: TaskConfig, p: Problem) -> list[int]:
    out = [t.bos]
    for k, x in enumerate((p.x0, p.x1)):
        for j in range(t.digits):
            if j > 0:
                out.append(t.blank)
            out.append(x[j])
        out.append(t.sep if k == 0 else t.eq)
    return out


def true_numbers(t: TaskConfig, p: Problem) -> list[list[int]]:
    """The K numbers the response must compute (exact arithmetic)."""
    xs = [list(p.x0), list(p.x1)]
    for _ in range(t.numbers):
        a, b = xs[-1], xs[-2]
        x, c = [], 0
        for j in range(t.digits):
            v = a[j] + b[j] + c
            x.append(v % t.base)
            c = v // t.base
        xs.append(x)
    return xs[2:]


def solution(t: TaskConfig, p: Problem, st: Style = Style(), drop: float = 0.0, rng: np.random.Generator | None = None) -> list[int]:
    """A worked solution (response tokens ending with EOS) in style `st`; each carry of 1 is
    dropped with probability `drop` (written as 0 and not added; later numbers are computed
    from the numbers as written)."""
    out: list[int] = []
    b, a = list(p.x0), list(p.x1)
    for k in range(t.numbers):
        x, c = [], 0
        for j in range(t.digits):
            if j > 0:
                if c == 1 and drop > 0 and rng.random() < drop:
                    c = 0
                out.append((t.alt_c1 if c else t.alt_c0) if st.alt_carries else (t.c1 if c else t.c0))
            v = a[j] + b[j] + c
            x.append(v % t.base)
            c = v // t.base
            out.append(t.alt_digit(x[j]) if st.alt_digits else t.digit(x[j]))
        out.append(t.eos if k + 1 == t.numbers else (st.separator if st.separator >= 0 else t.sep))
        b, a = a, x
    return out


def correct_solution(t: TaskConfig, p: Problem) -> list[int]:
    """The correct canonical solution (the teacher's source)."""
    return solution(t, p)


def random_style(t: TaskConfig, ps: float, pc: float, pd: float, rng: np.random.Generator) -> Style:
    sep = t.first_variant + int(rng.integers(t.num_variants)) if rng.random() < ps else -1
    return Style(alt_carries=bool(rng.random() < pc), alt_digits=bool(rng.random() < pd), separator=sep)


def student_source_solution(t: TaskConfig, p: Problem, h: float, e: float, rng: np.random.Generator) -> list[int]:
    """The student's supervised source: harmless style rate h (separator h, carries h/2,
    digits h/4), harmful error rate e (each carry of 1 dropped with probability e)."""
    return solution(t, p, random_style(t, h, h / 2, h / 4, rng), e, rng)


def surface_noise(t: TaskConfig, sol: list[int], rate: float, rng: np.random.Generator) -> list[int]:
    """Rewrites each token, with probability `rate`, in another surface form of the same value
    (the teacher's training contexts: it reads every notation, its targets stay canonical)."""
    out = list(sol)
    for i, tok in enumerate(out):
        if not rng.random() < rate:
            continue
        if t.digit_value(tok) >= 0:
            out[i] = t.alt_digit(t.digit_value(tok))
        elif t.carry_value(tok) >= 0:
            out[i] = t.alt_c1 if t.carry_value(tok) else t.alt_c0
        elif t.is_separator(tok):
            out[i] = t.first_variant + int(rng.integers(t.num_variants))
    return out


def verify(t: TaskConfig, p: Problem, response: list[int]) -> bool:
    """pass@1 check of a response (the tokens after the prompt)."""
    if len(response) != t.response_length or response[-1] != t.eos:
        return False
    L = t.block_length
    for k in range(t.numbers):
        for s in range(L):
            tok = response[k * L + s]
            if s == L - 1:
                if k + 1 < t.numbers and not t.is_separator(tok):
                    return False
            elif s % 2 == 0:
                if t.digit_value(tok) < 0:
                    return False
            elif t.carry_value(tok) < 0:
                return False
    last = true_numbers(t, p)[-1]
    return all(t.digit_value(response[(t.numbers - 1) * L + 2 * j]) == last[j] for j in range(t.digits))


def classify(t: TaskConfig, p: Problem, response: list[int], j: int) -> int:
    """CANONICAL, VARIANT (right value in a surface form the grader accepts: harmless) or ERROR
    (wrong value, wrong class for the slot, or beyond the response: harmful) for response[j],
    judged from the tokens before it (the two numbers before as written, the carry just written)."""
    y = response[j]
    if j >= t.response_length:
        return ERROR
    L = t.block_length
    k, s = divmod(j, L)
    form = VARIANT if t.is_variant(y) else CANONICAL
    if s == L - 1:
        if k + 1 == t.numbers:
            return CANONICAL if y == t.eos else ERROR
        return form if t.is_separator(y) else ERROR

    def written(back: int, i: int) -> int:
        kk = k - back  # -1: x1 (prompt), -2: x0 (prompt)
        if kk == -1:
            return p.x1[i]
        if kk == -2:
            return p.x0[i]
        return t.digit_value(response[kk * L + 2 * i])

    i = s // 2  # digit slot i (s = 2i) or the carry into digit i + 1 (s = 2i + 1)
    c = t.carry_value(response[k * L + 2 * i - 1]) if i > 0 else 0
    a, b = written(1, i), written(2, i)
    known = a >= 0 and b >= 0 and c >= 0
    if s % 2 == 0:
        v = t.digit_value(y)
        if v < 0 or (known and v != (a + b + c) % t.base):
            return ERROR
        return form
    v = t.carry_value(y)
    if v < 0 or (known and v != (a + b + c) // t.base):
        return ERROR
    return form


def distinct_problems(t: TaskConfig, count: int, rng: np.random.Generator, exclude: set) -> list[Problem]:
    """`count` distinct random problems not in `exclude` (added to it)."""
    out: list[Problem] = []
    tries = 0
    while len(out) < count:
        p = random_problem(t, rng)
        if p in exclude:
            tries += 1
            if tries > 1000 * count:
                break
            continue
        exclude.add(p)
        out.append(p)
    return out
