"""examples/torch (the demo's experiment through PyTorch): the task's generator and grader on
hand-worked examples, and a few steps of its training loop through tropd.torch.distill_loss."""

import copy
import math
import os
import sys

import numpy as np
import pytest
import torch

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "torch")
sys.path.insert(0, os.path.abspath(EXAMPLE))

import distill  # noqa: E402
import task as tk  # noqa: E402
from model import WindowLM, sample  # noqa: E402

import tropd  # noqa: E402

T = tk.TaskConfig()
# x0 = 123, x1 = 989 (digits least significant first): 112, 101, 213, 314, 527, 841 (docs/results.md).
P = tk.Problem((3, 2, 1), (9, 8, 9))
C0, C1, SEP, EOS = T.c0, T.c1, T.sep, T.eos


def test_token_ids_match_the_cpp_demo():
    assert (T.c0, T.c1, T.alt_c0, T.alt_c1, T.sep, T.eq, T.bos, T.eos, T.pad, T.blank, T.first_variant) == (
        20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30)
    assert T.prompt_length == 13 and T.response_length == 36


def test_prompt_and_canonical_solution_by_hand():
    assert tk.prompt_tokens(T, P) == [26, 3, 29, 2, 29, 1, 24, 9, 29, 8, 29, 9, 25]
    assert tk.true_numbers(T, P) == [[2, 1, 1], [1, 0, 1], [3, 1, 2], [4, 1, 3], [7, 2, 5], [1, 4, 8]]
    sol = tk.correct_solution(T, P)
    assert len(sol) == 36
    assert sol[:12] == [2, C1, 1, C1, 1, SEP, 1, C1, 0, C1, 1, SEP]  # 989 + 123 = 1112, 112 + 989 = 1101
    assert sol[-6:] == [1, C1, 4, C0, 8, EOS]  # 314 + 527 = 841
    assert tk.verify(T, P, sol)
    assert all(tk.classify(T, P, sol, j) == tk.CANONICAL for j in range(36))


def test_grader_accepts_surface_variants_and_classify_calls_them_harmless():
    var = tk.solution(T, P, tk.Style(alt_digits=True, alt_carries=True, separator=T.first_variant + 7))
    assert var[:6] == [12, 23, 11, 23, 11, 37]
    assert tk.verify(T, P, var)
    assert tk.classify(T, P, var, 0) == tk.VARIANT and tk.classify(T, P, var, 5) == tk.VARIANT
    assert tk.classify(T, P, var, 35) == tk.CANONICAL  # EOS


def test_grader_rejects_errors_and_classify_calls_them_harmful():
    sol = tk.correct_solution(T, P)
    dropped = list(sol)
    dropped[1] = C0  # the carry out of 3 + 9 written as 0: an error
    assert tk.classify(T, P, dropped, 1) == tk.ERROR
    # the next digit computed from the carry as written (2 + 8 + 0 = 10 -> 0) is right, not an error
    dropped[2] = 0
    assert tk.classify(T, P, dropped, 2) == tk.CANONICAL
    assert tk.classify(T, P, sol[:2] + [5], 2) == tk.ERROR  # a wrong digit
    assert tk.classify(T, P, sol[:5] + [EOS], 5) == tk.ERROR  # EOS in a separator slot
    wrong_last = sol[:-2] + [9, EOS]
    assert not tk.verify(T, P, wrong_last)
    assert not tk.verify(T, P, sol[:-1])  # no EOS
    assert not tk.verify(T, P, sol[:6] + [C1] + sol[7:])  # a carry in a digit slot


def test_sources_by_their_rates():
    rng = np.random.default_rng(0)
    # h = 0, e = 0: the student source is the canonical solution
    assert tk.student_source_solution(T, P, 0.0, 0.0, rng) == tk.correct_solution(T, P)
    # e = 1: every carry of 1 is dropped, so no C1 appears and the first carry is an error
    bad = tk.student_source_solution(T, P, 0.0, 1.0, rng)
    assert C1 not in bad and tk.classify(T, P, bad, 1) == tk.ERROR
    noisy = tk.surface_noise(T, tk.correct_solution(T, P), 1.0, rng)
    assert all(T.is_variant(y) for y in noisy[:-1]) and noisy[-1] == EOS and tk.verify(T, P, noisy)


def test_padded_batch_shifts_targets_and_origins():
    x, ids, org = distill.padded_batch([[5, 6, 7], [5, 6]], [[0, 2, 2], [0, 1]], T.pad, "cpu")
    assert x.tolist() == [[5, 6, 7], [5, 6, T.pad]]
    assert ids[0, :2].tolist() == [6, 7] and ids[1, 0].item() == 6
    assert org.tolist() == [[2, 2, 0], [1, 0, 0]]


def test_opd_through_tropd_equals_the_hand_written_policy_gradient_on_the_padded_batch():
    # The example's wiring (shifted ids, origin tags, padding rows as PROMPT) against OPD written
    # in plain PyTorch: gradient of -mean over student tokens of stopgrad(R) log p_S(y); the
    # reported value is the policy-gradient surrogate at rho = 1, -mean(R) (the K1 reverse KL).
    torch.manual_seed(0)
    seqs = [[26, 3, 4, 5, 6], [26, 7, 8]]
    origins = [[0, 0, 2, 2, 2], [0, 1, 2]]  # the second: one teacher-prefix token, then a student token
    x, ids, org = distill.padded_batch(seqs, origins, T.pad, "cpu")
    z = torch.randn(2, 5, T.vocab_size, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 5, T.vocab_size, dtype=torch.float64)
    loss, _ = tropd.torch.distill_loss(z, ids, org, objective=tropd.presets.opd(), teacher_logits=u)
    (g,) = torch.autograd.grad(loss, z)
    zz = z.detach().clone().requires_grad_(True)
    ls, lt = torch.log_softmax(zz, -1), torch.log_softmax(u, -1)
    ly = ls.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    R = (lt.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - ly).detach()
    m = org == distill.STUDENT
    assert m.sum().item() == 4
    ref = -(R * ly)[m].mean()
    (gr,) = torch.autograd.grad(ref, zz)
    assert torch.allclose(loss, -R[m].mean(), rtol=1e-9, atol=1e-12)
    assert torch.allclose(g, gr, rtol=1e-7, atol=1e-12)
    assert g[org == distill.PROMPT].abs().max().item() == 0.0


@pytest.fixture(scope="module")
def mini_models():
    """A briefly trained teacher and student start (the setup's SFT, in miniature)."""
    torch.manual_seed(0)
    teacher = WindowLM(T.vocab_size, T.max_sequence, hidden=32, pad=T.pad)
    student = WindowLM(T.vocab_size, T.max_sequence, hidden=16, pad=T.pad)
    distill.supervised(teacher, T, 80, 16, 3e-2, 1, False, 0.0, 0.0, set(), "cpu")
    distill.supervised(student, T, 15, 16, 3e-2, 2, True, 0.5, 0.15, set(), "cpu")
    return teacher, student


@pytest.mark.parametrize("method", ["opd", "tropd"])
def test_on_policy_steps_lower_the_reverse_kl_on_fixed_contexts(method, mini_models):
    # A miniature of the experiment: the example's loop (sample from the student, distill.update)
    # and the reverse KL at the response positions of eight fixed canonical solutions (a
    # deterministic function of the student) before and after ten steps.
    teacher, student = mini_models[0], copy.deepcopy(mini_models[1])
    probs = [tk.random_problem(T, np.random.default_rng(100 + i)) for i in range(8)]
    x, _, org = distill.padded_batch([tk.prompt_tokens(T, p) + tk.correct_solution(T, p) for p in probs],
                                     [[distill.PROMPT] * 13 + [distill.STUDENT] * 36] * 8, T.pad, "cpu")
    mask = org == distill.STUDENT

    def rkl():
        with torch.no_grad():
            ls, lt = torch.log_softmax(student(x), -1), torch.log_softmax(teacher(x), -1)
            return float((ls.exp() * (ls - lt)).sum(-1)[mask].mean())

    obj = distill.objective(method, distill.parse([]))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    before = rkl()
    for step in range(10):
        prompts = [tk.prompt_tokens(T, tk.random_problem(T, np.random.default_rng([step, i]))) for i in range(8)]
        conts = sample(student, prompts, T.max_new_tokens, T.eos, T.pad, 1.0, gen)
        xs, ids, og = distill.padded_batch([p + c for p, c in zip(prompts, conts)],
                                           [[distill.PROMPT] * len(p) + [distill.STUDENT] * len(c)
                                            for p, c in zip(prompts, conts)], T.pad, "cpu")
        loss, gn, diag = distill.update(student, teacher, opt, xs, ids, og, obj, seed=0, step=step)
        assert math.isfinite(loss) and math.isfinite(gn) and gn > 0
        assert float(diag["n_student"]) == (og == distill.STUDENT).sum().item()
    after = rkl()
    print(f"{method}: reverse KL on the fixed contexts {before:.3f} -> {after:.3f}")
    assert before > 0.5  # the two start apart
    assert after < 0.95 * before, (before, after)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(SystemExit):
        distill.parse(["--methods", "opd,nope"])
    with pytest.raises(ValueError, match="unknown method"):
        distill.objective("nope", distill.parse([]))


def test_sampler_stops_at_the_models_last_position():
    # A context with a full teacher prefix may leave little or no room: the continuation ends at
    # the model's last position (empty when the context fills it), never past it.
    torch.manual_seed(0)
    m = WindowLM(T.vocab_size, T.max_sequence, hidden=8, pad=T.pad)
    with torch.no_grad():
        m.head.bias.fill_(-100.0)
        m.head.bias[3] = 100.0  # always token 3: never EOS
    full, short, room2 = [1] * T.max_sequence, [1] * 5, [1] * (T.max_sequence - 2)
    out = sample(m, [full, short, room2], T.max_new_tokens, T.eos, T.pad, 1.0, torch.Generator().manual_seed(0))
    assert out[0] == [] and out[1] == [3] * T.max_new_tokens and out[2] == [3, 3]
    greedy = sample(m, [short], 4, T.eos, T.pad, 0.0, None)
    assert greedy == [[3, 3, 3, 3]]
