"""Row level (tropd.torch.distill_loss): every preset against the float64 reference of
reference.py (written from method.md), padded and packed layouts, teacher logits and served
teachers, aggregation modes, temperatures, strided inputs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import tropd
import tropd.torch as tt
from helpers import PRESET_CASES, PROMPT, STUDENT, TEACHER, padded_batch, to_packed, topk_lists, trusted_from
from reference import row_loss

SERVED = {"opd", "reopold", "entropy_opd", "clip_outlier", "mask_outlier", "fkl_outlier", "tropd", "gopd"}


def run_tropd(cfg, b, *, layout, old=True, **kw):
    z = b["z"].clone().requires_grad_()
    args = dict(objective=cfg, teacher_logits=b["u"], **kw)
    if old:
        args["old_logprobs"] = b["s_old"]
    if cfg.preset == "gopd":
        args["ref_logprobs"] = b["ref"]
    if layout == "packed":
        args["seq_offsets"] = b["seq_offsets"]
    loss, diag = tt.distill_loss(z, b["ids"], b["origin"], **args)
    loss.backward()
    return loss, z.grad, diag


def run_reference(cfg, b, diag, *, old=True, step=0, **kw):
    V = b["z"].shape[-1]
    z = b["z"].detach().double().reshape(-1, V).clone().requires_grad_()
    n = z.shape[0]
    offs = b["seq_offsets"].tolist() if "seq_offsets" in b else list(range(0, n + 1, b["z"].shape[1]))
    u = b["u"].double().reshape(n, V)
    loss = row_loss(cfg, z, b["ids"].reshape(n), b["origin"].reshape(n), offs, u=u,
                    s_old=b["s_old"].reshape(n) if old else None, ref=b["ref"].reshape(n),
                    trusted_given=trusted_from(diag), step=step, **kw)  # fmt: skip
    loss.backward()
    return loss, z.grad


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name,cfg,extra", PRESET_CASES, ids=[c[0] for c in PRESET_CASES])
def test_preset_matches_reference(name, cfg, extra, layout):
    b = padded_batch(seed=11)
    if layout == "packed":
        b = to_packed(b, [8, 5, 6])
    step = extra.get("step", 0)
    loss, grad, diag = run_tropd(cfg, b, layout=layout, seed=5, step=step)
    ref_loss, ref_grad = run_reference(cfg, b, diag, step=step)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad.reshape(ref_grad.shape), ref_grad, rtol=1e-9, atol=1e-12)
    # Prompt rows get an exact zero gradient.
    prompt = (b["origin"] == PROMPT).reshape(-1)
    assert (grad.reshape(ref_grad.shape)[prompt] == 0).all()
    # The diagnostics' loss is the loss.
    assert diag["loss"].item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-15)
    assert diag["flags"].shape == b["origin"].shape and diag["advantage"].shape == b["origin"].shape


def test_stochastic_presets_have_both_regions():
    """The TrOPD cases above exercise trusted tokens and outliers (else they test half the rule)."""
    b = padded_batch(seed=11)
    _, _, diag = run_tropd(tropd.presets.tropd(k=4), b, layout="padded", seed=5)
    assert diag["n_trusted"].item() > 0 and diag["n_outlier"].item() > 0


@pytest.mark.parametrize("name", sorted(SERVED))
def test_served_teacher_matches_teacher_logits(name):
    """The teacher as token log-probs + top-k lists (shuffled, -inf padded, unnormalised for the
    renormalised tail) gives the reference's loss and gradient computed from those lists."""
    cfg = next(c for n, c, _ in PRESET_CASES if n == name or n.startswith(name))
    b = padded_batch(seed=3)
    B, T, V = b["z"].shape
    lt = torch.log_softmax(b["u"], -1)
    t = lt.gather(-1, b["ids"][..., None])[..., 0]
    kw = dict(objective=cfg, teacher_token_logprobs=t, old_logprobs=b["s_old"], seed=9)
    if cfg.preset == "gopd":
        kw["ref_logprobs"] = b["ref"]
    lists = None
    if cfg.info["needs_topk"]:
        shift = 0.7 if cfg.tail == "renormalised" else 0.0
        lists = topk_lists(b["u"], cfg.k, pad=1, shift=shift, seed=4)
        kw.update(teacher_topk_ids=lists[0], teacher_topk_logprobs=lists[1])
    z = b["z"].clone().requires_grad_()
    loss, diag = tt.distill_loss(z, b["ids"], b["origin"], **kw)
    loss.backward()
    n = B * T
    zr = b["z"].reshape(n, V).clone().requires_grad_()
    rk = {}
    if lists is not None:
        rk = dict(topk_ids=lists[0].reshape(n, -1), topk_lp=lists[1].reshape(n, -1))
    ref = row_loss(cfg, zr, b["ids"].reshape(n), b["origin"].reshape(n), list(range(0, n + 1, T)), t=t.reshape(n),
                   s_old=b["s_old"].reshape(n), ref=b["ref"].reshape(n), trusted_given=trusted_from(diag), **rk)  # fmt: skip
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z.grad.reshape(n, V), zr.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["token_mean", "kept_token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "sum_over_constant"])
@pytest.mark.parametrize("normaliser", [None, 37.5])
def test_aggregation_modes_and_external_normaliser(mode, normaliser):
    cfg = tropd.presets.mask_outlier(tau=-1.0, guidance_beta=0.1, aggregation=mode, aggregation_constant=4.0)
    b = to_packed(padded_batch(seed=5), [8, 4, 7])
    loss, grad, diag = run_tropd(cfg, b, layout="packed", normaliser=normaliser)
    ref_loss, ref_grad = run_reference(cfg, b, diag, normaliser=normaliser)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    if normaliser is not None:
        assert diag["normaliser"].item() == normaliser


def test_normaliser_as_tensor_scales_the_loss():
    b = padded_batch(seed=6)
    cfg = tropd.presets.opd()
    l1, _, d1 = run_tropd(cfg, b, layout="padded")
    l2, _, _ = run_tropd(cfg, b, layout="padded", normaliser=torch.tensor(2.0 * d1["normaliser"].item()))
    torch.testing.assert_close(l2, l1 / 2)


@pytest.mark.parametrize("cfg", [tropd.presets.tropd(k=4, beta=0.05), tropd.presets.gkd(beta=0.6), tropd.presets.opd()], ids=["tropd", "gkd", "opd"])
def test_temperatures(cfg):
    b = padded_batch(seed=8)
    loss, grad, diag = run_tropd(cfg, b, layout="padded", student_temperature=1.7, teacher_temperature=0.6, seed=2)
    ref_loss, ref_grad = run_reference(cfg, b, diag, Ts=1.7, Tt=0.6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad.reshape(ref_grad.shape), ref_grad, rtol=1e-9, atol=1e-12)


def test_default_old_logprobs_is_the_current_value():
    """Without old_logprobs, s_old = s detached (rho = 1): the reference with s_old = None."""
    cfg = tropd.presets.tropd(k=4, beta=0.05)
    b = padded_batch(seed=12)
    loss, grad, diag = run_tropd(cfg, b, layout="padded", old=False, seed=3)
    ref_loss, ref_grad = run_reference(cfg, b, diag, old=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad.reshape(ref_grad.shape), ref_grad, rtol=1e-9, atol=1e-12)


def test_strided_and_sliced_inputs():
    """Row-padded logits (row stride > V) are read in place; a sliced batch ([:, :-1]) is copied;
    both give the contiguous answer."""
    b = padded_batch(seed=13)
    B, T, V = b["z"].shape
    cfg = tropd.presets.tropd(k=4)
    loss0, grad0, _ = run_tropd(cfg, b, layout="padded", seed=1)
    wide = torch.zeros(B, T, V + 5, dtype=torch.float64)
    wide[..., :V] = b["z"]
    zs = wide.clone().requires_grad_()
    view = zs[..., :V]
    loss1, _ = tt.distill_loss(view, b["ids"], b["origin"], objective=cfg, teacher_logits=b["u"], old_logprobs=b["s_old"], seed=1)
    loss1.backward()
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    torch.testing.assert_close(zs.grad[..., :V], grad0, rtol=0, atol=0)
    assert (zs.grad[..., V:] == 0).all()
    # A sliced time axis: pad one position and slice it away.
    longer = torch.cat([b["z"], torch.zeros(B, 1, V, dtype=torch.float64)], 1).requires_grad_()
    loss2, _ = tt.distill_loss(longer[:, :T], b["ids"], b["origin"], objective=cfg, teacher_logits=b["u"], old_logprobs=b["s_old"], seed=1)
    loss2.backward()
    torch.testing.assert_close(loss2, loss0, rtol=0, atol=0)
    torch.testing.assert_close(longer.grad[:, :T], grad0, rtol=0, atol=0)


def test_bool_origin_and_ignore_index():
    """A bool mask means student samples; token ids at masked positions are not read (-100)."""
    b = padded_batch(seed=14)
    mask = b["origin"] == STUDENT
    ids = torch.where(mask, b["ids"], torch.full_like(b["ids"], -100))
    cfg = tropd.presets.opd()
    z = b["z"].clone().requires_grad_()
    loss, _ = tt.distill_loss(z, ids, mask, objective=cfg, teacher_logits=b["u"], old_logprobs=b["s_old"])
    origin = torch.where(mask, STUDENT, PROMPT)
    loss2, _ = tt.distill_loss(b["z"], b["ids"], origin, objective=cfg, teacher_logits=b["u"], old_logprobs=b["s_old"])
    torch.testing.assert_close(loss, loss2, rtol=0, atol=0)


def test_preset_functions_equal_distill_loss():
    b = padded_batch(seed=15)
    args = (b["z"], b["ids"], b["origin"])
    l1, _ = tt.tropd_loss(*args, k=4, beta=0.02, teacher_logits=b["u"], seed=3)
    l2, _ = tt.distill_loss(*args, objective=tropd.presets.tropd(k=4, beta=0.02), teacher_logits=b["u"], seed=3)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    for name, cfg, _ in PRESET_CASES:
        fn = getattr(tt, f"{cfg.preset}_loss")
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        kw = dict(teacher_logits=b["u"], ref_logprobs=b["ref"], old_logprobs=b["s_old"], step=3)
        la, _ = fn(*args, **fields, **kw)
        lb, _ = tt.distill_loss(*args, objective=cfg, **kw)
        torch.testing.assert_close(la, lb, rtol=0, atol=0, msg=name)


def test_no_grad_skips_the_gradient():
    b = padded_batch(seed=16)
    with torch.no_grad():
        loss, _ = tt.distill_loss(b["z"].requires_grad_(), b["ids"], b["origin"], objective=tropd.presets.opd(), teacher_logits=b["u"])
    assert not loss.requires_grad
    loss2, _ = tt.distill_loss(b["z"].detach(), b["ids"], b["origin"], objective=tropd.presets.opd(), teacher_logits=b["u"])
    torch.testing.assert_close(loss, loss2, rtol=0, atol=0)


def test_trust_region_rule():
    """TrOPD's region (method.md 4.2): R >= 0 always trusted, R = -inf always an outlier; the same
    (seed, step) give the same decisions, another step other ones; and E[1 - M] = TV estimate:
    the outlier fraction matches mean(1 - min(1, e^R)) within 5 standard errors."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    s = -torch.rand(n, generator=g, dtype=torch.float64) * 3 - 0.01
    t = (s + torch.randn(n, generator=g, dtype=torch.float64)).clamp(max=0)
    t[:50] = -math.inf
    origin = torch.full((n,), STUDENT)
    offs = torch.tensor([0, n // 2, n])
    fk = tropd.presets.tropd(k=1)  # one-entry lists: the region is the point here
    ids = torch.zeros(n, 1, dtype=torch.int64)
    lists = dict(teacher_topk_ids=ids, teacher_topk_logprobs=torch.zeros(n, 1, dtype=torch.float64), student_topk_logprobs=s[:, None] * 0 - 0.1)
    _, d1 = tt.distill_loss_from_logprobs(s, t, origin, objective=fk, seq_offsets=offs, seed=1, step=7, **lists)
    _, d2 = tt.distill_loss_from_logprobs(s, t, origin, objective=fk, seq_offsets=offs, seed=1, step=7, **lists)
    _, d3 = tt.distill_loss_from_logprobs(s, t, origin, objective=fk, seq_offsets=offs, seed=1, step=8, **lists)
    m1, m2, m3 = trusted_from(d1), trusted_from(d2), trusted_from(d3)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    R = t - s
    assert m1[R >= 0].all() and not m1[R == -math.inf].any()
    expected = (1 - torch.exp(R.clamp(max=0))).mean().item()
    frac = 1 - m1.double().mean().item()
    se = math.sqrt(expected * (1 - expected) / n)
    assert abs(frac - expected) < 5 * se
    assert d1["tv_estimate"].item() == pytest.approx(expected, rel=1e-12)


def test_sequence_ids_key_the_draws():
    """Global sequence ids: the same sequence gives the same decisions in any micro-batch."""
    b = padded_batch(B=4, T=16, seed=17)
    cfg = tropd.presets.tropd(k=4)
    _, d_all = tt.distill_loss(b["z"], b["ids"], b["origin"], objective=cfg, teacher_logits=b["u"], old_logprobs=b["s_old"],
                               sequence_ids=torch.tensor([10, 11, 12, 13]), seed=4)  # fmt: skip
    _, d_half = tt.distill_loss(b["z"][2:], b["ids"][2:], b["origin"][2:], objective=cfg, teacher_logits=b["u"][2:],
                                old_logprobs=b["s_old"][2:], sequence_ids=torch.tensor([12, 13]), seed=4)  # fmt: skip
    assert torch.equal(d_all["flags"][2:], d_half["flags"])
