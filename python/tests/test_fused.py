"""The fused LM head (tropd.torch.fused_linear_distill_loss, host::fused_lm_head) against
independent float64 references: the logits materialised in float64 by PyTorch
(z = transform(h @ W.T + b)) and given to the unfused tropd.torch.distill_loss, the method.md
reference of reference.py on the same logits, and a naive OPD K1 loss written here without
tropd. Gradients to the hidden states, the weight and the bias come from PyTorch's autograd
through those references (and torch.autograd.gradcheck on tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch

import tropd
import tropd.torch as tt
from helpers import PRESET_CASES, PROMPT, STUDENT, TEACHER, sample_ids, topk_lists, trusted_from
from reference import row_loss

SERVED = {"opd", "reopold", "entropy_opd", "clip_outlier", "mask_outlier", "fkl_outlier", "tropd", "gopd"}


def head_batch(B=3, T=8, H=6, V=13, HT=5, seed=0, dtype=torch.float64):
    """Student hidden states [B, T, H], weight [V, H], bias [V]; the teacher's head
    ([B, T, HT], [V, HT], [V]); ids sampled from the student's logits; origin tags (2 prompt
    positions per row, a 2-token teacher prefix in row 0); rollout-time and reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    h, W, b = r(B, T, H), 0.9 * r(V, H), 0.3 * r(V)
    th, tW, tb = r(B, T, HT), 0.9 * r(V, HT), 0.3 * r(V)
    z = h @ W.T + b
    ids = sample_ids(z, g)
    origin = torch.full((B, T), STUDENT, dtype=torch.int64)
    origin[:, :2] = PROMPT
    origin[0, 2:4] = TEACHER
    s = torch.log_softmax(z, -1).gather(-1, ids[..., None])[..., 0]
    s_old = s + 0.3 * r(B, T)
    ref = torch.log_softmax(z + r(B, T, V), -1).gather(-1, ids[..., None])[..., 0]
    c = lambda x: x.to(dtype)  # noqa: E731
    return dict(h=c(h), W=c(W), b=c(b), th=c(th), tW=c(tW), tb=c(tb), ids=ids, origin=origin, s_old=s_old, ref=ref)


def logits64(h, W, b=None, scale=1.0, softcap=0.0):
    """z = softcap * tanh(scale * (h W^T + b) / softcap) (no tanh for softcap 0), in float64."""
    x = h.double() @ W.double().T
    if b is not None:
        x = x + b.double()
    y = scale * x
    return softcap * torch.tanh(y / softcap) if softcap > 0 else y


def _kwargs(cfg, d, teacher, **kw):
    args = dict(objective=cfg, old_logprobs=d["s_old"], **kw)
    if cfg.preset == "gopd":
        args["ref_logprobs"] = d["ref"]
    if teacher == "head":
        args.update(teacher_hidden=d["th"], teacher_weight=d["tW"], teacher_bias=d["tb"])
    elif teacher == "logits":
        args["teacher_logits"] = d["u"]
    return args


def fused(cfg, d, *, teacher="head", bias=True, w_grad=True, **kw):
    """The fused call; returns (loss, diag, dh, dW, db)."""
    h = d["h"].clone().requires_grad_()
    W = d["W"].clone().requires_grad_(w_grad)
    b = d["b"].clone().requires_grad_() if bias else None
    loss, diag = tt.fused_linear_distill_loss(h, W, d["ids"], d["origin"], bias=b, **_kwargs(cfg, d, teacher, **kw))
    loss.backward()
    return loss, diag, h.grad, W.grad, (b.grad if bias else None)


def unfused(cfg, d, *, teacher="head", bias=True, scale=1.0, softcap=0.0, teacher_scale=1.0, teacher_softcap=0.0, **kw):
    """The reference: float64 logits materialised by PyTorch, the unfused tropd.torch.distill_loss,
    PyTorch's autograd back to h, W, b."""
    h = d["h"].double().clone().requires_grad_()
    W = d["W"].double().clone().requires_grad_()
    b = d["b"].double().clone().requires_grad_() if bias else None
    z = logits64(h, W, b, scale, softcap)
    dd = dict(d)
    if teacher == "head":
        dd["u"] = logits64(d["th"], d["tW"], d["tb"], teacher_scale, teacher_softcap)
        teacher = "logits"
    elif teacher == "logits":
        dd["u"] = d["u"].double()
    loss, diag = tt.distill_loss(z, d["ids"], d["origin"], **_kwargs(cfg, dd, teacher, **kw))
    loss.backward()
    return loss, diag, h.grad, W.grad, (b.grad if bias else None)


def assert_same(a, r, rtol=1e-9, atol=1e-12):
    loss, diag, dh, dW, db = a
    rloss, rdiag, rdh, rdW, rdb = r
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=atol)
    torch.testing.assert_close(dh.double(), rdh, rtol=rtol, atol=atol)
    torch.testing.assert_close(dW.double(), rdW, rtol=rtol, atol=atol)
    if db is not None:
        torch.testing.assert_close(db.double(), rdb, rtol=rtol, atol=atol)
    assert torch.equal(diag["flags"], rdiag["flags"])
    torch.testing.assert_close(diag["advantage"].double(), rdiag["advantage"].double(), rtol=rtol, atol=atol)
    for name in ("n_counted", "n_kept", "n_trusted", "n_outlier", "normaliser"):
        assert diag[name].item() == rdiag[name].item(), name


CASES = [(n, c, e) for n, c, e in PRESET_CASES]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("teacher", ["head", "logits"])
@pytest.mark.parametrize("name,cfg,extra", CASES, ids=IDS)
def test_preset_matches_materialised_logits(name, cfg, extra, teacher):
    """Every preset, the teacher as a head or as logits, chunk 5 (does not divide n = 24): the
    loss, dL/dh, dL/dW, dL/db, flags and advantages of the unfused call on float64 logits."""
    d = head_batch(seed=21)
    d["u"] = logits64(d["th"], d["tW"], d["tb"])
    kw = dict(seed=5, step=extra.get("step", 0), chunk=5)
    got = fused(cfg, d, teacher=teacher, **kw)
    kw.pop("chunk")
    ref = unfused(cfg, d, teacher=teacher, **kw)
    assert_same(got, ref)
    assert got[1]["fused_chunk"].item() == 5
    assert torch.isfinite(got[2]).all() and torch.isfinite(got[3]).all()
    # Prompt rows: exact zero dL/dh.
    prompt = d["origin"] == PROMPT
    assert (got[2][prompt] == 0).all()


@pytest.mark.parametrize("name,cfg,extra", CASES, ids=IDS)
def test_preset_matches_method_reference(name, cfg, extra):
    """Every preset against reference.py (method.md, written without tropd) on the float64
    logits, with TrOPD's / FKL-outlier's stochastic trust mask taken from the fused call."""
    d = head_batch(seed=22)
    step = extra.get("step", 0)
    loss, diag, dh, dW, db = fused(cfg, d, seed=3, step=step, chunk=7)
    B, T, V = d["h"].shape[0], d["h"].shape[1], d["W"].shape[0]
    n = B * T
    h = d["h"].reshape(n, -1).clone().requires_grad_()
    W = d["W"].clone().requires_grad_()
    b = d["b"].clone().requires_grad_()
    z = logits64(h, W, b)
    u = logits64(d["th"].reshape(n, -1), d["tW"], d["tb"])
    ref = row_loss(cfg, z, d["ids"].reshape(n), d["origin"].reshape(n), list(range(0, n + 1, T)), u=u,
                   s_old=d["s_old"].reshape(n), ref=d["ref"].reshape(n), trusted_given=trusted_from(diag), step=step)  # fmt: skip
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dh.reshape(n, -1), h.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(dW, W.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(db, b.grad, rtol=1e-8, atol=1e-12)


def naive_opd_k1(h, W, b, ids, origin, u):
    """OPD with the K1 estimator, from its definition, without tropd: per student token
    L_i = -exp(s_i - sg(s_i)) * sg(log p_T(y_i) - log p_S(y_i)), averaged over student tokens
    (its gradient is -(t_i - s_i) grad s_i / N)."""
    z = h @ W.T + b
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    logq = u - torch.logsumexp(u, -1, keepdim=True)
    s = logp.gather(-1, ids[..., None])[..., 0]
    t = logq.gather(-1, ids[..., None])[..., 0]
    mask = origin == STUDENT
    L = -torch.exp(s - s.detach()) * (t - s).detach()
    return torch.where(mask, L, torch.zeros_like(L)).sum() / mask.sum()


@pytest.mark.parametrize("chunk", [0, 1, 5, 8, 24, 100])
def test_opd_k1_against_naive_torch(chunk):
    d = head_batch(seed=23)
    h = d["h"].clone().requires_grad_()
    W = d["W"].clone().requires_grad_()
    b = d["b"].clone().requires_grad_()
    loss, diag = tt.fused_linear_distill_loss(h, W, d["ids"], d["origin"], bias=b, objective=tropd.presets.opd(),
                                              teacher_hidden=d["th"], teacher_weight=d["tW"], teacher_bias=d["tb"],
                                              chunk=chunk)  # fmt: skip
    loss.backward()
    h2 = d["h"].clone().requires_grad_()
    W2 = d["W"].clone().requires_grad_()
    b2 = d["b"].clone().requires_grad_()
    u = d["th"] @ d["tW"].T + d["tb"]
    ref = naive_opd_k1(h2, W2, b2, d["ids"], d["origin"], u)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-9, atol=1e-12)
    assert diag["fused_chunk"].item() == (24 if chunk in (0, 100) else chunk)


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 23, 24, 0])
@pytest.mark.parametrize("cfg", [tropd.presets.tropd(k=4, beta=0.05), tropd.presets.entropy_opd(fraction=0.3)], ids=["tropd", "entropy_opd"])
def test_chunk_sizes(cfg, chunk):
    """One sweep (TrOPD) and two sweeps (Entropy OPD: a batch quantile) over chunk sizes that
    do and do not divide n = 24."""
    d = head_batch(seed=24)
    got = fused(cfg, d, chunk=chunk, seed=2)
    ref = unfused(cfg, d, seed=2)
    assert_same(got, ref)
    assert got[1]["fused_sweeps"].item() == (1 if cfg.preset == "tropd" else 2)


def test_scratch_budget_picks_the_chunk():
    """chunk = 0: the largest chunk whose buffers fit scratch_budget; the call reports the bytes."""
    d = head_batch(B=4, T=16, V=40, seed=25)
    budget = 20 * 40 * 8 * 2  # about 20 rows of student and teacher logits (float64)
    got = fused(tropd.presets.opd(), d, scratch_budget=budget)
    ref = unfused(tropd.presets.opd(), d)
    assert_same(got, ref)
    c = got[1]["fused_chunk"].item()
    assert 1 <= c < 64 and got[1]["fused_scratch_bytes"].item() <= budget
    assert got[1]["fused_scratch_bytes"].item() >= c * 40 * 8 * 2


@pytest.mark.parametrize("cfg", [tropd.presets.tropd(k=4, beta=0.05), tropd.presets.opd(), tropd.presets.gkd(beta=0.3)], ids=["tropd", "opd", "gkd"])
def test_logit_scale_softcap_temperatures(cfg):
    d = head_batch(seed=26)
    t = dict(scale=0.8, softcap=3.0, teacher_scale=1.3, teacher_softcap=4.0)
    kw = dict(seed=1, student_temperature=1.4, teacher_temperature=0.7)
    got = fused(cfg, d, logit_scale=0.8, softcap=3.0, teacher_logit_scale=1.3, teacher_softcap=4.0, chunk=5, **kw)
    ref = unfused(cfg, d, **t, **kw)
    assert_same(got, ref)


@pytest.mark.parametrize("name", sorted(SERVED))
def test_served_teacher(name):
    """The teacher as token log-probs (+ shuffled, padded, unnormalised top-k lists)."""
    cfg = next(c for n, c, _ in PRESET_CASES if n == name or n.startswith(name))
    d = head_batch(seed=27)
    lt = torch.log_softmax(logits64(d["th"], d["tW"], d["tb"]), -1)
    t = lt.gather(-1, d["ids"][..., None])[..., 0]
    kw = dict(teacher_token_logprobs=t, seed=4)
    if cfg.info["needs_topk"]:
        ids, lp = topk_lists(lt, cfg.k, pad=1, shift=0.5 if cfg.tail == "renormalised" else 0.0, seed=3)
        kw.update(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    got = fused(cfg, d, teacher="served", chunk=5, **kw)
    ref = unfused(cfg, d, teacher="served", **kw)
    assert_same(got, ref)


def test_packed_layout_with_offsets():
    cfg = tropd.presets.tropd(k=4, beta=0.05, aggregation="seq_mean_token_mean")
    d = head_batch(seed=28)
    n = 24
    p = {k: (v.reshape(n, *v.shape[2:]) if k in ("h", "th", "ids", "origin", "s_old", "ref") else v) for k, v in d.items()}
    offs = torch.tensor([0, 5, 13, 24])
    got = fused(cfg, p, chunk=4, seq_offsets=offs, seed=6)
    ref = unfused(cfg, p, seq_offsets=offs, seed=6)
    assert_same(got, ref)
    assert got[1]["flags"].shape == (n,)


def test_without_bias():
    d = head_batch(seed=29)
    got = fused(tropd.presets.opd(), d, bias=False, chunk=6)
    ref = unfused(tropd.presets.opd(), d, bias=False)
    assert_same(got, ref)


def test_frozen_weight_gets_no_gradient():
    """weight.requires_grad = False: dL/dW is neither computed (the op's output is empty) nor
    returned; dL/dh and dL/db are unchanged."""
    d = head_batch(seed=30)
    loss, diag, dh, dW, db = fused(tropd.presets.tropd(k=4, beta=0.05), d, w_grad=False, chunk=5)
    assert dW is None
    _, _, rdh, _, rdb = unfused(tropd.presets.tropd(k=4, beta=0.05), d)
    torch.testing.assert_close(dh, rdh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(db, rdb, rtol=1e-9, atol=1e-12)
    args = _op_args(d, grad_weight=False)
    out = torch.ops.tropd.fused_lm_head(*args)
    assert out[2].numel() == 0 and out[1].shape == (24, 6) and out[3].shape == (13,)


def test_no_grad_mode_computes_no_gradient():
    d = head_batch(seed=31)
    h = d["h"].clone().requires_grad_()
    with torch.no_grad():
        loss, diag = tt.fused_linear_distill_loss(h, d["W"], d["ids"], d["origin"], teacher_hidden=d["th"],
                                                  teacher_weight=d["tW"], old_logprobs=d["s_old"],
                                                  objective=tropd.presets.opd())  # fmt: skip
    assert not loss.requires_grad and loss.grad_fn is None
    ref = unfused(tropd.presets.opd(), dict(d, tb=torch.zeros(13, dtype=torch.float64)), bias=False)
    torch.testing.assert_close(loss, ref[0], rtol=1e-10, atol=1e-12)
    assert diag["n_counted"].item() == ref[1]["n_counted"].item()


@pytest.mark.parametrize("cfg", [tropd.presets.opd(eps_low=0.2, eps_high=0.2), tropd.presets.tropd(k=3, beta=0.05, form="p"),
                                 tropd.presets.gkd(beta=0.4)], ids=["opd", "tropd_p", "gkd"])  # fmt: skip
def test_gradcheck(cfg):
    """torch.autograd.gradcheck (float64) of the loss wrt the hidden states, the weight and the
    bias, with a logit scale and a soft-cap, on tiny shapes (chunk 2 of n = 5)."""
    d = head_batch(B=1, T=5, H=3, V=7, HT=2, seed=32)

    def f(h, W, b):
        loss, _ = tt.fused_linear_distill_loss(h, W, d["ids"], d["origin"], bias=b, objective=cfg, teacher_hidden=d["th"],
                                               teacher_weight=d["tW"], old_logprobs=d["s_old"], logit_scale=0.9,
                                               softcap=4.0, chunk=2, seed=1)  # fmt: skip
        return loss

    inputs = (d["h"].clone().requires_grad_(), d["W"].clone().requires_grad_(), d["b"].clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float32_matches_float64_reference():
    cfg = tropd.presets.tropd(k=4, beta=0.05)
    d64 = head_batch(seed=33)
    d32 = head_batch(seed=33, dtype=torch.float32)
    loss, diag, dh, dW, db = fused(cfg, d32, chunk=5, seed=1)
    assert loss.dtype == torch.float32 and dh.dtype == torch.float32 and dW.dtype == torch.float32
    # The reference on the same (fp32-rounded) inputs in float64.
    d = {k: (v.double() if v.is_floating_point() else v) for k, v in d32.items()}
    d["s_old"], d["ref"] = d64["s_old"], d64["ref"]
    ref = unfused(cfg, d, seed=1)
    assert_same((loss, diag, dh, dW, db), ref, rtol=2e-4, atol=2e-5)


def test_bfloat16_head_is_widened():
    """bf16 hidden states and weight: computed in fp32; gradients come back in bf16."""
    cfg = tropd.presets.opd()
    d = head_batch(seed=34, dtype=torch.bfloat16)
    loss, diag, dh, dW, db = fused(cfg, d, chunk=5)
    assert dh.dtype == torch.bfloat16 and dW.dtype == torch.bfloat16 and db.dtype == torch.bfloat16
    dd = {k: (v.double() if v.is_floating_point() else v) for k, v in d.items()}
    ref = unfused(cfg, dd)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh.double(), ref[2], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(dW.double(), ref[3], rtol=1e-2, atol=1e-3)


# --- bad input: one test per case --------------------------------------------------------------


def _call(d, **kw):
    args = dict(objective=tropd.presets.opd(), teacher_hidden=d["th"], teacher_weight=d["tW"])
    args.update(kw)
    h = args.pop("h", d["h"])
    W = args.pop("W", d["W"])
    ids = args.pop("ids", d["ids"])
    origin = args.pop("origin", d["origin"])
    return tt.fused_linear_distill_loss(h, W, ids, origin, **args)


@pytest.fixture
def d():
    return head_batch(seed=40)


def test_error_hidden_size_differs_from_weight(d):
    with pytest.raises(ValueError, match="student_weight must be \\[V, H\\] with H = 6"):
        _call(d, W=d["W"][:, :5])


def test_error_hidden_rank(d):
    with pytest.raises(ValueError, match="student_hidden must be \\[B, T, H\\] or \\[N, H\\]"):
        _call(d, h=d["h"].reshape(-1))


def test_error_bias_size(d):
    with pytest.raises(ValueError, match="bias has shape \\(12,\\), expected \\(13,\\)"):
        _call(d, bias=d["b"][:12])


def test_error_token_ids_shape(d):
    with pytest.raises(ValueError, match="token_ids has shape"):
        _call(d, ids=d["ids"][:, :7])


def test_error_origin_shape(d):
    with pytest.raises(ValueError, match="origin has shape"):
        _call(d, origin=d["origin"].reshape(-1))


def test_error_teacher_hidden_rows(d):
    with pytest.raises(ValueError, match="teacher_hidden has shape"):
        _call(d, teacher_hidden=d["th"][:, :7])


def test_error_teacher_vocabulary_differs(d):
    """The library's check (host::fused_lm_head): teacher and student vocabulary sizes differ."""
    with pytest.raises(tropd.InvalidInputError, match="vocabulary sizes differ") as e:
        _call(d, teacher_weight=d["tW"][:12])
    assert e.value.code == "shape_mismatch"


def test_error_teacher_hidden_size_differs_from_its_weight(d):
    with pytest.raises(tropd.InvalidInputError, match="teacher head: hidden .* different H_T"):
        _call(d, teacher_weight=d["tW"][:, :4])


def test_error_teacher_logits_vocabulary(d):
    u = logits64(d["th"], d["tW"])[..., :12]
    with pytest.raises(tropd.InvalidInputError) as e:
        _call(d, teacher_hidden=None, teacher_weight=None, teacher_logits=u)
    assert e.value.code == "shape_mismatch"


def test_error_weight_dtype_differs(d):
    with pytest.raises(ValueError, match="student_weight is torch.float32 but student_hidden is torch.float64"):
        _call(d, W=d["W"].float())


def test_error_integer_hidden_states(d):
    with pytest.raises(ValueError, match="student_hidden must be float32, float64, bfloat16 or float16"):
        _call(d, h=d["h"].long())


def test_error_bias_dtype(d):
    with pytest.raises(ValueError, match="bias must be a tensor of the hidden states' dtype"):
        _call(d, bias=d["b"].float())


def test_error_float_token_ids(d):
    with pytest.raises(ValueError, match="token_ids must be an integer tensor"):
        _call(d, ids=d["ids"].double())


def test_error_token_id_out_of_range(d):
    ids = d["ids"].clone()
    ids[1, 5] = 13
    with pytest.raises(tropd.InvalidInputError) as e:
        _call(d, ids=ids)
    assert e.value.row == 13 and e.value.sequence == 1 and e.value.position == 5


def test_error_no_teacher(d):
    with pytest.raises(ValueError, match="the teacher is missing"):
        _call(d, teacher_hidden=None, teacher_weight=None)


def test_error_two_teachers(d):
    with pytest.raises(ValueError, match="pass the teacher one way"):
        _call(d, teacher_logits=logits64(d["th"], d["tW"]))


def test_error_teacher_weight_without_hidden(d):
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight go together"):
        _call(d, teacher_hidden=None)


def test_error_served_teacher_for_full_distribution_objective(d):
    t = torch.zeros(d["ids"].shape, dtype=torch.float64)
    with pytest.raises(tropd.InvalidInputError, match="teacher's full distribution"):
        _call(d, objective=tropd.presets.gkd(), teacher_hidden=None, teacher_weight=None, teacher_token_logprobs=t)


def test_error_negative_chunk(d):
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        _call(d, chunk=-1)


def test_error_negative_softcap(d):
    with pytest.raises(tropd.InvalidInputError, match="softcap must be finite and >= 0"):
        _call(d, softcap=-1.0)


def test_error_non_finite_hidden_state(d):
    h = d["h"].clone()
    h[2, 3, 1] = math.nan
    with pytest.raises(tropd.EvaluationError) as e:
        _call(d, h=h)
    assert e.value.row == 19


def test_error_non_cpu_tensors(d):
    """No device binding of the fused head: tensors not on the CPU raise NotImplementedError."""
    with pytest.raises(NotImplementedError, match="CPU tensors only"):
        _call(d, h=d["h"].to("meta"), W=d["W"].to("meta"))


# --- torch.library ------------------------------------------------------------------------------


def _op_args(d, grad_hidden=True, grad_weight=True, grad_bias=True):
    B, T, H = d["h"].shape
    n = B * T
    ids = d["ids"].reshape(n).to(torch.int32)
    origin = d["origin"].reshape(n).to(torch.uint8)
    # s_old with surely trusted (R >= 0) and surely outlier (R = -30) tokens: every diagnostic
    # defined (opcheck compares with NaN != NaN).
    u = logits64(d["th"], d["tW"], d["tb"]).reshape(n, -1)
    t = torch.log_softmax(u, -1).gather(1, ids.long()[:, None])[:, 0]
    s_old = torch.where(torch.arange(n) % 2 == 1, t + 30.0, t - 0.5)
    return (d["h"].reshape(n, H).clone().requires_grad_(grad_hidden), d["W"].clone().requires_grad_(grad_weight),
            d["b"].clone().requires_grad_(grad_bias), d["th"].reshape(n, -1), d["tW"], d["tb"], None, None, ids, origin,
            torch.arange(0, n + 1, T), None, s_old, None, None, None, None, torch.tensor(9.0, dtype=torch.float64),
            tropd.presets.tropd(k=3, beta=0.05).spec(), 3, 4, 0.9, 5.0, 1.1, 0.0, 1.0, 1.0, 5, 256 << 20, False,
            grad_hidden, grad_weight, grad_bias)  # fmt: skip


@pytest.mark.parametrize("grads", [(True, True, True), (True, False, True), (False, False, False)], ids=["all", "frozen_weight", "none"])
def test_opcheck_fused(grads):
    d = head_batch(B=2, T=4, H=3, V=9, HT=2, seed=41)
    result = torch.library.opcheck(torch.ops.tropd.fused_lm_head.default, _op_args(d, *grads))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    d = head_batch(B=2, T=6, H=4, V=11, HT=3, seed=42)
    cfg = tropd.presets.tropd(k=3, beta=0.05)

    def step_fn(h, W, b, th, tW, ids, origin, s_old, step):
        loss, diag = tt.fused_linear_distill_loss(h, W, ids, origin, bias=b, objective=cfg, teacher_hidden=th, teacher_weight=tW,
                                                  old_logprobs=s_old, seed=1, step=step, softcap=6.0, chunk=5)  # fmt: skip
        return 2.0 * loss, diag["trust_fraction"], diag["flags"]

    compiled = torch.compile(step_fn, fullgraph=True)
    for step in (1, 2):
        ins_c = [d[k].clone().requires_grad_() for k in ("h", "W", "b")]
        ins_e = [d[k].clone().requires_grad_() for k in ("h", "W", "b")]
        rest = (d["th"], d["tW"], d["ids"], d["origin"], d["s_old"], step)
        out_c = compiled(*ins_c, *rest)
        out_e = step_fn(*ins_e, *rest)
        out_c[0].backward()
        out_e[0].backward()
        torch.testing.assert_close(out_c[0], out_e[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out_c[1], out_e[1])
        assert torch.equal(out_c[2], out_e[2])
        for a, b in zip(ins_c, ins_e):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_backward_scaled_and_retained_graph():
    """grad_output != 1 scales every gradient; with grad_output = 1 the saved gradients are handed
    to autograd (a leaf adopts them): a retained graph's second backward adds the right values,
    and once an adopted .grad has been modified in place (that accumulation) a further backward is
    refused by autograd's version check (never a stale gradient)."""
    d = head_batch(seed=35)
    _, _, rdh, rdW, rdb = unfused(tropd.presets.opd(), d)
    h = d["h"].clone().requires_grad_()
    W = d["W"].clone().requires_grad_()
    b = d["b"].clone().requires_grad_()
    loss, _ = tt.fused_linear_distill_loss(h, W, d["ids"], d["origin"], bias=b, **_kwargs(tropd.presets.opd(), d, "head"))
    (2.5 * loss).backward(retain_graph=True)
    torch.testing.assert_close(W.grad, 2.5 * rdW, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h.grad, 2.5 * rdh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.grad, 2.5 * rdb, rtol=1e-9, atol=1e-12)
    h.grad = W.grad = b.grad = None
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(W.grad, 2 * rdW, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h.grad, 2 * rdh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.grad, 2 * rdb, rtol=1e-9, atol=1e-12)
    # The second backward accumulated into the adopted (saved) gradients: the graph refuses a third.
    h.grad = W.grad = b.grad = None
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
