"""torch.library registration: opcheck of both ops (schema, fake tensors, autograd registration,
AOT dispatch) and torch.compile(fullgraph=True) without a graph break, equal to eager.

opcheck compares outputs with NaN != NaN, and a diagnostic that is undefined for a batch is NaN
(tropd/objective/diagnostics.hpp: e.g. the mean reward of outliers when there are none, the
teacher's entropy for a served teacher). The opcheck batches are therefore built so that every
diagnostic is defined: teacher logits (or given entropies and KL), and rollout-time log-probs
that make some tokens surely trusted (R >= 0) and others surely outliers (R = -30)."""

from __future__ import annotations

import torch

import tropd
import tropd.torch as tt
from helpers import padded_batch


def _both_regions(b):
    """s_old such that R = t - s_old is >= 0 on even positions and -30 on odd ones."""
    t = torch.log_softmax(b["u"], -1).gather(-1, b["ids"][..., None])[..., 0]
    odd = (torch.arange(t.shape[-1]) % 2 == 1).expand_as(t)
    return torch.where(odd, t + 30.0, t - 0.5)


def _rows_args(cfg, b, compute_grad=True, served=False):
    B, T, V = b["z"].shape
    n = B * T
    z = b["z"].reshape(n, V).clone().requires_grad_(compute_grad)
    ids = b["ids"].reshape(n).to(torch.int32)
    origin = b["origin"].reshape(n).to(torch.uint8)
    offs = torch.arange(0, n + 1, T)
    if served:
        lt = torch.log_softmax(b["u"].reshape(n, V), -1)
        t = lt.gather(1, ids.long()[:, None])[:, 0]
        lp, tk = torch.topk(lt, cfg.k, -1)
        teacher = (None, t)
        lists = (tk.to(torch.int32), lp)
    else:
        teacher = (b["u"].reshape(n, V), None)
        lists = (None, None)
    return (z, *teacher, ids, origin, offs, None, _both_regions(b).reshape(n), None, *lists, None, torch.tensor(7.0, dtype=torch.float64),
            cfg.spec(), 3, 4, 1.0, 1.0, False, compute_grad)  # fmt: skip


def test_opcheck_rows():
    b = padded_batch(B=2, T=4, V=9, seed=41)
    cfg = tropd.presets.tropd(k=3, beta=0.05)
    for args in (_rows_args(cfg, b), _rows_args(cfg, b, compute_grad=False)):
        result = torch.library.opcheck(torch.ops.tropd.rows.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_tokens():
    b = padded_batch(B=2, T=4, V=9, seed=42)
    n = 8
    ls = torch.log_softmax(b["z"].reshape(n, -1), -1)
    lt = torch.log_softmax(b["u"].reshape(n, -1), -1)
    ids = b["ids"].reshape(n)
    lp, tk = torch.topk(lt, 3, -1)
    p, q = ls.exp(), lt.exp()
    ent_s, ent_t, rkl = -(p * ls).sum(-1), -(q * lt).sum(-1), (p * (ls - lt)).sum(-1)
    args = (ls.gather(1, ids[:, None])[:, 0].detach().requires_grad_(), lt.gather(1, ids[:, None])[:, 0],
            b["origin"].reshape(n).to(torch.uint8), torch.arange(0, n + 1, 4), None, _both_regions(b).reshape(n),
            ls.gather(1, tk).detach().requires_grad_(), tk.to(torch.int32), lp, None, ent_s, ent_t, rkl, None, None,
            tropd.presets.tropd(k=3, form="p").spec(), 1, 2, False)  # fmt: skip
    result = torch.library.opcheck(torch.ops.tropd.tokens.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compile_fullgraph_matches_eager():
    """Both entry points inside one compiled function (fullgraph: a graph break is an error),
    the loss scaled and summed so the backward goes through the compiled graph; the step changes
    between calls (a Python int: at most one recompile, then it is dynamic)."""
    torch._dynamo.reset()
    b = padded_batch(B=2, T=6, V=11, seed=43)
    cfg = tropd.presets.tropd(k=3, beta=0.05)
    opd = tropd.presets.opd()

    def step_fn(z, u, ids, origin, s_old, step):
        loss_r, d = tt.distill_loss(z, ids, origin, objective=cfg, teacher_logits=u, old_logprobs=s_old, seed=1, step=step)
        ls = torch.log_softmax(z, -1).gather(-1, ids[..., None])[..., 0]
        lt = torch.log_softmax(u, -1).gather(-1, ids[..., None])[..., 0]
        loss_t, _ = tt.distill_loss_from_logprobs(ls, lt, origin, objective=opd, old_logprobs=s_old)
        return 0.5 * loss_r + loss_t, d["trust_fraction"], d["flags"]

    compiled = torch.compile(step_fn, fullgraph=True)
    for step in (1, 2):
        z1 = b["z"].clone().requires_grad_()
        z2 = b["z"].clone().requires_grad_()
        out_c = compiled(z1, b["u"], b["ids"], b["origin"], b["s_old"], step)
        out_e = step_fn(z2, b["u"], b["ids"], b["origin"], b["s_old"], step)
        out_c[0].backward()
        out_e[0].backward()
        torch.testing.assert_close(out_c[0], out_e[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out_c[1], out_e[1])
        assert torch.equal(out_c[2], out_e[2])
        torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-12, atol=1e-14)
