"""Token level (tropd.torch.distill_loss_from_logprobs): every preset without a dense term
against the float64 reference, padded and packed; the gradient reaches the log-probs."""

from __future__ import annotations

import pytest
import torch

import tropd
import tropd.torch as tt
from helpers import PRESET_CASES, padded_batch, to_packed, trusted_from
from reference import objective_loss


def token_inputs(b: dict, k: int):
    """Per-token inputs computed from the batch's logits (as a trainer would)."""
    ls = torch.log_softmax(b["z"].double(), -1)
    lt = torch.log_softmax(b["u"].double(), -1)
    ids = b["ids"][..., None]
    p, q = ls.exp(), lt.exp()
    out = dict(
        s=ls.gather(-1, ids)[..., 0],
        t=lt.gather(-1, ids)[..., 0],
        ent_s=-(p * ls).sum(-1),
        ent_t=-(q * lt).sum(-1),
        rkl=(p * (ls - lt)).sum(-1),
    )
    tk_lp, tk_ids = torch.topk(lt, k, -1)
    out.update(topk_ids=tk_ids, topk_teacher=tk_lp, topk_student=ls.gather(-1, tk_ids))
    g = torch.Generator().manual_seed(1)
    out["topk_student_old"] = out["topk_student"] + 0.2 * torch.randn(out["topk_student"].shape, generator=g, dtype=torch.float64)
    return out


TOKEN_CASES = [c for c in PRESET_CASES if c[1].preset != "gkd"]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name,cfg,extra", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_preset_matches_reference(name, cfg, extra, layout):
    b = padded_batch(seed=21)
    x = token_inputs(b, 4)
    x.update(origin=b["origin"], s_old=b["s_old"], ref=b["ref"])
    if layout == "packed":
        x = to_packed(x, [8, 6, 3])
    step = extra.get("step", 0)
    info = cfg.info
    s = x["s"].clone().requires_grad_()
    sk = x["topk_student"].clone().requires_grad_()
    kw = dict(objective=cfg, old_logprobs=x["s_old"], seed=7, step=step)
    if layout == "packed":
        kw["seq_offsets"] = x["seq_offsets"]
    if info["needs_topk"]:
        kw.update(student_topk_logprobs=sk, teacher_topk_ids=x["topk_ids"], teacher_topk_logprobs=x["topk_teacher"],
                  old_topk_logprobs=x["topk_student_old"])  # fmt: skip
    if info["needs_student_entropy"]:
        kw["student_entropy"] = x["ent_s"]
    if info["needs_teacher_entropy"]:
        kw["teacher_entropy"] = x["ent_t"]
    if info["needs_rkl"]:
        kw["rkl"] = x["rkl"]
    if info["needs_ref"]:
        kw["ref_logprobs"] = x["ref"]
    loss, diag = tt.distill_loss_from_logprobs(s, x["t"], x["origin"], **kw)
    loss.backward()
    assert loss.dtype == torch.float64

    n = s.numel()
    offs = x["seq_offsets"].tolist() if layout == "packed" else list(range(0, n + 1, s.shape[1]))
    rs = x["s"].reshape(n).clone().requires_grad_()
    rk = x["topk_student"].reshape(n, -1).clone().requires_grad_()
    ref = objective_loss(cfg, rs, x["t"].reshape(n), x["origin"].reshape(n), offs, s_old=x["s_old"].reshape(n),
                         ent_s=x["ent_s"].reshape(n), ent_t=x["ent_t"].reshape(n), rkl=x["rkl"].reshape(n),
                         ref=x["ref"].reshape(n), topk_teacher=x["topk_teacher"].reshape(n, -1), topk_student=rk,
                         topk_student_old=x["topk_student_old"].reshape(n, -1), trusted_given=trusted_from(diag),
                         step=step)  # fmt: skip
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.grad.reshape(n), rs.grad, rtol=1e-9, atol=1e-12)
    if info["needs_topk"]:
        assert sk.grad is not None
        torch.testing.assert_close(sk.grad.reshape(n, -1), rk.grad if rk.grad is not None else torch.zeros_like(rk), rtol=1e-9, atol=1e-12)
    assert diag["flags"].shape == x["origin"].shape


def test_token_and_row_level_agree():
    """The same batch through both entry points: the same loss, and dL/dz of the row level equals
    dL/ds pushed through log_softmax (method.md 1: d ls_y / dz = e_y - p)."""
    b = padded_batch(seed=22)
    cfg = tropd.presets.tropd(k=4, beta=0.05, form="p")
    z = b["z"].clone().requires_grad_()
    loss_r, d_r = tt.distill_loss(z, b["ids"], b["origin"], objective=cfg, teacher_logits=b["u"], old_logprobs=b["s_old"], seed=3)
    loss_r.backward()
    z2 = b["z"].clone().requires_grad_()
    ls = torch.log_softmax(z2, -1)
    lt = torch.log_softmax(b["u"], -1)
    tk_lp, tk_ids = torch.topk(lt, 4, -1)
    loss_t, d_t = tt.distill_loss_from_logprobs(
        ls.gather(-1, b["ids"][..., None])[..., 0], lt.gather(-1, b["ids"][..., None])[..., 0], b["origin"], objective=cfg,
        old_logprobs=b["s_old"], student_topk_logprobs=ls.gather(-1, tk_ids), teacher_topk_ids=tk_ids,
        teacher_topk_logprobs=tk_lp, seed=3)  # fmt: skip
    loss_t.backward()
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z2.grad, z.grad, rtol=1e-9, atol=1e-13)
    assert torch.equal(d_t["flags"], d_r["flags"])


def test_bf16_logprobs_are_taken_as_fp32():
    b = padded_batch(seed=23)
    x = token_inputs(b, 4)
    s = x["s"].to(torch.bfloat16).requires_grad_()
    loss, _ = tt.distill_loss_from_logprobs(s, x["t"].float(), b["origin"], objective=tropd.presets.opd())
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    ref, _ = tt.distill_loss_from_logprobs(s.detach().float(), x["t"].float(), b["origin"], objective=tropd.presets.opd())
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
