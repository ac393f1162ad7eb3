"""Autograd: torch.autograd.gradcheck in float64 on small shapes at both entry points, the
backward's scaling by grad_output, and fp32 / bf16 / fp16 logits within stated tolerances
(the gradient comes back in the logits' dtype)."""

from __future__ import annotations

import pytest
import torch

import tropd
import tropd.torch as tt
from helpers import padded_batch, topk_lists

# gradcheck needs rollout-time values that do not move with the perturbed logits: old_logprobs
# and old_topk_logprobs (form C's detached advantage) are given, so trust decisions, advantages
# and the selected top-k ids are fixed and the loss is a smooth function of the student's logits.
# (vOPD's baseline, the detached per-position KL, is computed from the current logits at row level,
# so finite differences see it move: it is checked against the reference instead.)
GRADCHECK = [
    tropd.presets.opd(eps_low=0.2, eps_high=0.2),
    tropd.presets.tropd(k=3, beta=0.05),
    tropd.presets.tropd(k=3, beta=0.05, form="p", tail="tail_bucket"),
    tropd.presets.eopd(k=3, tau=2.0),
    tropd.presets.reopold(floor=-1.0, switch_step=0),
    tropd.presets.gkd(beta=0.4),
    tropd.presets.clip_outlier(tau=-1.0, guidance_beta=0.1),
]


@pytest.mark.parametrize("cfg", GRADCHECK, ids=lambda c: c.spec().split(";")[0] + ("_p" if getattr(c, "form", "c") == "p" else ""))
def test_gradcheck_rows(cfg):
    b = padded_batch(B=2, T=5, V=7, seed=31)
    z = b["z"].clone().requires_grad_()
    # The student's rollout-time log-probs at the teacher's top-k ids, in the order tropd selects
    # them (descending teacher probability).
    k = getattr(cfg, "k", 0)
    old_topk = None
    if cfg.info["needs_topk"]:
        ids = torch.topk(torch.log_softmax(b["u"], -1), k, -1).indices
        old_topk = torch.log_softmax(b["z"] / 1.3, -1).gather(-1, ids) - 0.05

    def f(z):
        return tt.distill_loss(z, b["ids"], b["origin"], objective=cfg, teacher_logits=b["u"], old_logprobs=b["s_old"],
                               old_topk_logprobs=old_topk, seed=2, student_temperature=1.3)[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_rows_served_teacher():
    b = padded_batch(B=2, T=5, V=9, seed=32)
    ids, lp = topk_lists(b["u"], 4, pad=1, shift=0.3)
    t = torch.log_softmax(b["u"], -1).gather(-1, b["ids"][..., None])[..., 0]
    cfg = tropd.presets.tropd(k=4, form="p")
    z = b["z"].clone().requires_grad_()

    def f(z):
        return tt.distill_loss(z, b["ids"], b["origin"], objective=cfg, teacher_token_logprobs=t, teacher_topk_ids=ids,
                               teacher_topk_logprobs=lp, old_logprobs=b["s_old"], seed=2)[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("form", ["c", "p"])
def test_gradcheck_tokens(form):
    b = padded_batch(B=2, T=5, V=9, seed=33)
    ls = torch.log_softmax(b["z"], -1)
    lt = torch.log_softmax(b["u"], -1)
    tk_lp, tk_ids = torch.topk(lt, 3, -1)
    s = ls.gather(-1, b["ids"][..., None])[..., 0].detach().requires_grad_()
    sk = ls.gather(-1, tk_ids).detach().requires_grad_()
    t = lt.gather(-1, b["ids"][..., None])[..., 0]
    cfg = tropd.presets.tropd(k=3, beta=0.05, form=form)

    def f(s, sk):
        return tt.distill_loss_from_logprobs(s, t, b["origin"], objective=cfg, old_logprobs=b["s_old"], student_topk_logprobs=sk,
                                             teacher_topk_ids=tk_ids, teacher_topk_logprobs=tk_lp,
                                             old_topk_logprobs=sk.detach(), seed=1)[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (s, sk), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_backward_scales_by_grad_output():
    b = padded_batch(seed=34)
    cfg = tropd.presets.tropd(k=4)
    z = b["z"].clone().requires_grad_()
    loss, _ = tt.distill_loss(z, b["ids"], b["origin"], objective=cfg, teacher_logits=b["u"])
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * -2.5, z, retain_graph=True)  # and the saved gradient is not consumed
    (g3,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(g2, -2.5 * g1, rtol=0, atol=0)
    torch.testing.assert_close(g3, g1, rtol=0, atol=0)


# Tolerances against the float64 evaluation of the same (rounded) logits:
#   loss:     relative 1e-5 (fp32 row passes; fp32, bf16 and fp16 inputs all widen to fp32);
#   gradient: |g - g64| <= rel * |g64| + abs, rel = 1e-5 (fp32), 2^-8 (bf16 rounding), 2^-11 (fp16
#             rounding), abs = 1e-6 * max|g64| for all (fp32 accumulation), plus 6e-8 for fp16
#             (its smallest subnormal: tiny gradient entries keep only absolute precision).
DTYPES = {
    torch.float32: (1e-5, 0.0),
    torch.bfloat16: (2.0**-8, 0.0),
    torch.float16: (2.0**-11, 6e-8),
}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("cfg", [tropd.presets.tropd(k=4, beta=0.05), tropd.presets.gkd(beta=0.5), tropd.presets.opd()], ids=["tropd", "gkd", "opd"])
def test_low_precision_logits(dtype, cfg):
    b = padded_batch(B=3, T=6, V=300, seed=35)
    z = b["z"].to(dtype).requires_grad_()
    u = b["u"].to(dtype)
    loss, diag = tt.distill_loss(z, b["ids"], b["origin"], objective=cfg, teacher_logits=u, old_logprobs=b["s_old"], seed=3)
    loss.backward()
    assert loss.dtype == torch.float32
    assert z.grad.dtype == dtype
    z64 = z.detach().double().requires_grad_()
    loss64, diag64 = tt.distill_loss(z64, b["ids"], b["origin"], objective=cfg, teacher_logits=u.double(), old_logprobs=b["s_old"], seed=3)
    loss64.backward()
    assert torch.equal(diag["flags"], diag64["flags"])
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-7)
    rel, abs_ = DTYPES[dtype]
    g, g64 = z.grad.double(), z64.grad
    bound = rel * g64.abs() + 1e-6 * g64.abs().max() + abs_
    assert ((g - g64).abs() <= bound).all(), float(((g - g64).abs() - bound).max())


def test_gradient_accumulation_across_calls():
    """Two losses backwarded in turn accumulate into z.grad. The backward hands autograd the saved
    gradient itself when grad_output is 1 (no [n x V] copy); if a consumer then writes into it
    (AccumulateGrad adding the next gradient), a later backward through the retained graph is
    refused by autograd's version check: loudly, never with a stale gradient."""
    b = padded_batch(seed=36)
    cfg = tropd.presets.tropd(k=4)
    z = b["z"].clone().requires_grad_()
    l1, _ = tt.distill_loss(z, b["ids"], b["origin"], objective=cfg, teacher_logits=b["u"], seed=1)
    l2, _ = tt.distill_loss(z, b["ids"], b["origin"], objective=tropd.presets.opd(), teacher_logits=b["u"])
    (g1,) = torch.autograd.grad(l1, z, retain_graph=True)
    (g2,) = torch.autograd.grad(l2, z, retain_graph=True)
    g1, g2 = g1.clone(), g2.clone()
    l1.backward(retain_graph=True)
    l2.backward()
    torch.testing.assert_close(z.grad, g1 + g2, rtol=1e-14, atol=1e-15)
    try:
        l1.backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
    else:
        torch.testing.assert_close(z.grad, 2 * g1 + g2, rtol=1e-14, atol=1e-15)
    # With grad_output != 1 the product is a new tensor: repeated retained backwards accumulate.
    z.grad = None
    l3, _ = tt.distill_loss(z, b["ids"], b["origin"], objective=cfg, teacher_logits=b["u"], seed=1)
    (2 * l3).backward(retain_graph=True)
    (2 * l3).backward()
    torch.testing.assert_close(z.grad, 4 * g1, rtol=1e-14, atol=1e-15)
