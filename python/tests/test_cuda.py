"""CUDA tensors (marked `cuda`: skipped where torch sees no GPU). A CPU-only build refuses them
with a ValueError; a build with TROPD_PYTHON_CUDA=ON runs tropd::gpu (python/src/gpu*.cu), which
must agree with tropd's CPU path and with the float64 reference of reference.py, for every preset,
fp32 and bf16 logits, with gradients, at row and token level.

Tolerances (docs/gpu.md "Agreement with the host"): the device's row passes sum fp32 terms in
another order with hardware exponentials (1e-5 relative on fp32 rows); the token stages run in
double on both sides (1e-12 relative on float64 per-token inputs). bf16 gradients are compared
after both sides rounded their fp32 gradient to bf16 (one bf16 ulp apart at most). The
stochastic trust region's decisions come from each backend's own R (the flags must agree: a
draw within ~1e-6 of R would be the one legitimate difference, and these small batches have none).
"""

from __future__ import annotations

import math

import pytest
import torch

import tropd
import tropd.torch as tt
from helpers import PRESET_CASES, padded_batch, to_packed, topk_lists, trusted_from
from reference import objective_loss, row_loss

pytestmark = pytest.mark.cuda

SERVED = {"opd", "reopold", "entropy_opd", "clip_outlier", "mask_outlier", "fkl_outlier", "tropd", "gopd"}
TOKEN_CASES = [c for c in PRESET_CASES if c[1].preset != "gkd"]
DTYPES = [torch.float32, torch.bfloat16]


def needs_cuda_build():
    if not tropd.cuda_compiled:
        pytest.skip("the extension was built without its CUDA dispatch (TROPD_PYTHON_CUDA=OFF): see test_cpu_only_build_refuses_cuda")


# ---------------------------------------------------------------------------------------------
# Row level
# ---------------------------------------------------------------------------------------------


def run_rows(cfg, b, device, dtype, *, layout="padded", step=0, **kw):
    """distill_loss on `device` with logits of `dtype`: (loss, dL/dz, diagnostics) on the CPU."""
    z = b["z"].to(dtype).to(device).detach().clone().requires_grad_()  # never the batch's own tensor
    args = dict(objective=cfg, teacher_logits=b["u"].to(dtype).to(device), old_logprobs=b["s_old"].to(device), seed=5, step=step)
    if cfg.preset == "gopd":
        args["ref_logprobs"] = b["ref"].to(device)
    if layout == "packed":
        args["seq_offsets"] = b["seq_offsets"].to(device)
    # Tensors go to `device`, except the normaliser (a CPU tensor is a case of its own).
    args.update({k: (v.to(device) if isinstance(v, torch.Tensor) and k != "normaliser" else v) for k, v in kw.items()})
    loss, diag = tt.distill_loss(z, b["ids"].to(device), b["origin"].to(device), **args)
    loss.backward()
    assert z.grad is not None and z.grad.dtype == dtype and z.grad.device == z.device
    return loss.detach().cpu(), z.grad.cpu(), {k: v.cpu() for k, v in diag.items()}


def reference_rows(cfg, b, dtype, diag, *, layout="padded", step=0):
    """The float64 reference on the same (dtype-rounded) logits, with the decisions of `diag`."""
    V = b["z"].shape[-1]
    z = b["z"].to(dtype).double().reshape(-1, V).clone().requires_grad_()
    n = z.shape[0]
    offs = b["seq_offsets"].tolist() if layout == "packed" else list(range(0, n + 1, b["z"].shape[1]))
    u = b["u"].to(dtype).double().reshape(n, V)
    loss = row_loss(cfg, z, b["ids"].reshape(n), b["origin"].reshape(n), offs, u=u, s_old=b["s_old"].reshape(n),
                    ref=b["ref"].reshape(n), trusted_given=trusted_from(diag), step=step)  # fmt: skip
    loss.backward()
    return loss.detach(), z.grad


def close_grad(got, want, dtype, what):
    """Elementwise against the larger of the row's scale and the value (docs/gpu.md)."""
    got, want = got.double().reshape(want.shape), want.double()
    scale = want.abs().max().item()
    if dtype == torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * scale + 1e-6, msg=what)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-7, msg=what)


def close_stats(got: dict, want: dict, rtol: float, atol: float):
    for name in tropd.DIAGNOSTIC_NAMES:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=rtol, atol=atol, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name,cfg,extra", PRESET_CASES, ids=[c[0] for c in PRESET_CASES])
def test_rows_match_cpu_and_reference(name, cfg, extra, layout, dtype):
    needs_cuda_build()
    b = padded_batch(seed=11)
    if layout == "packed":
        b = to_packed(b, [8, 5, 6])
    step = extra.get("step", 0)
    loss_g, grad_g, diag_g = run_rows(cfg, b, "cuda", dtype, layout=layout, step=step)
    loss_c, grad_c, diag_c = run_rows(cfg, b, "cpu", dtype, layout=layout, step=step)
    assert loss_g.dtype == loss_c.dtype == torch.float32
    assert torch.isfinite(grad_g.float()).all()
    # Against the CPU path: the same decisions, loss, diagnostics and gradient.
    assert torch.equal(diag_g["flags"], diag_c["flags"]), name
    torch.testing.assert_close(loss_g, loss_c, rtol=1e-5, atol=1e-6)
    close_stats(diag_g, diag_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diag_g["advantage"], diag_c["advantage"], rtol=1e-5, atol=1e-6)
    close_grad(grad_g, grad_c.double(), dtype, f"{name}: CUDA vs CPU gradient")
    # Against the float64 reference (written from method.md).
    ref_loss, ref_grad = reference_rows(cfg, b, dtype, diag_g, layout=layout, step=step)
    torch.testing.assert_close(loss_g.double(), ref_loss, rtol=1e-5, atol=1e-6)
    close_grad(grad_g, ref_grad, dtype, f"{name}: CUDA vs reference gradient")
    # Prompt rows get an exact zero gradient.
    prompt = (b["origin"] == tropd.PROMPT).reshape(-1)
    assert (grad_g.reshape(-1, grad_g.shape[-1])[prompt] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(SERVED))
def test_served_teacher_matches_cpu(name, dtype):
    """The teacher as token log-probs + top-k lists (shuffled, -inf padded) on the device."""
    needs_cuda_build()
    cfg = next(c for n, c, _ in PRESET_CASES if n == name or n.startswith(name))
    b = padded_batch(seed=3)
    t = torch.log_softmax(b["u"], -1).gather(-1, b["ids"][..., None])[..., 0]
    kw = dict(teacher_logits=None, teacher_token_logprobs=t)
    if cfg.info["needs_topk"]:
        shift = 0.7 if cfg.tail == "renormalised" else 0.0
        ids, lp = topk_lists(b["u"], cfg.k, pad=1, shift=shift, seed=4)
        kw.update(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    loss_g, grad_g, diag_g = run_rows(cfg, b, "cuda", dtype, **kw)
    loss_c, grad_c, diag_c = run_rows(cfg, b, "cpu", dtype, **kw)
    assert torch.equal(diag_g["flags"], diag_c["flags"])
    torch.testing.assert_close(loss_g, loss_c, rtol=1e-5, atol=1e-6)
    close_stats(diag_g, diag_c, rtol=1e-5, atol=1e-6)
    close_grad(grad_g, grad_c.double(), dtype, name)


@pytest.mark.parametrize("normaliser", [37.5, "cuda_tensor", "cpu_tensor"])
def test_external_normaliser(normaliser):
    needs_cuda_build()
    cfg = tropd.presets.mask_outlier(tau=-1.0, guidance_beta=0.1, aggregation="seq_mean_token_sum")
    b = to_packed(padded_batch(seed=5), [8, 4, 7])
    value = {"cuda_tensor": torch.tensor(37.5, device="cuda"), "cpu_tensor": torch.tensor(37.5)}.get(normaliser, normaliser)
    loss_g, grad_g, diag_g = run_rows(cfg, b, "cuda", torch.float32, layout="packed", normaliser=value)
    loss_c, grad_c, diag_c = run_rows(cfg, b, "cpu", torch.float32, layout="packed", normaliser=37.5)
    assert diag_g["normaliser"].item() == 37.5
    torch.testing.assert_close(loss_g, loss_c, rtol=1e-5, atol=1e-6)
    close_grad(grad_g, grad_c.double(), torch.float32, "normaliser")


def test_temperatures_and_fp16_fp64():
    needs_cuda_build()
    b = padded_batch(seed=8)
    cfg = tropd.presets.tropd(k=4, beta=0.05)
    kw = dict(student_temperature=1.7, teacher_temperature=0.6)
    for dtype in (torch.float16, torch.float64):
        loss_g, grad_g, diag_g = run_rows(cfg, b, "cuda", dtype, **kw)
        loss_c, grad_c, diag_c = run_rows(cfg, b, "cpu", dtype, **kw)
        assert torch.equal(diag_g["flags"], diag_c["flags"])
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(loss_g, loss_c, rtol=tol, atol=tol)
        close_grad(grad_g, grad_c.double(), torch.bfloat16 if dtype == torch.float16 else torch.float32, str(dtype))


def test_runs_on_the_current_stream_and_device_memory_only():
    """A side stream: the result equals the default stream's; the call leaves nothing pending
    that a consumer on that stream could race with (it ends by reading its status word)."""
    needs_cuda_build()
    b = padded_batch(seed=31)
    cfg = tropd.presets.tropd(k=4, beta=0.05)
    loss0, grad0, _ = run_rows(cfg, b, "cuda", torch.float32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        loss1, grad1, _ = run_rows(cfg, b, "cuda", torch.float32)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    torch.testing.assert_close(grad1, grad0, rtol=0, atol=0)


def test_scratch_size_query():
    needs_cuda_build()
    from tropd import _C
    from torch.utils.dlpack import to_dlpack

    n, V = 6, 40
    z = torch.randn(n, V, device="cuda")
    ids = torch.zeros(n, dtype=torch.int32, device="cuda")
    origin = torch.full((n,), tropd.STUDENT, dtype=torch.uint8, device="cuda")
    offs = torch.tensor([0, n], dtype=torch.int64, device="cuda")
    loss = torch.empty((), device="cuda")
    stats = torch.empty(len(tropd.DIAGNOSTIC_NAMES), dtype=torch.float64, device="cuda")
    d = lambda t: None if t is None else to_dlpack(t)  # noqa: E731
    bytes_ = _C.rows_scratch_bytes(tropd.presets.opd().spec(), d(z), d(torch.randn(n, V, device="cuda")), None, d(ids), d(origin),
                                   d(offs), None, None, None, None, None, None, None, d(loss), d(stats), None, None, None, 0, 0,
                                   1.0, 1.0, 0.0, 1, False)  # fmt: skip
    assert isinstance(bytes_, int) and bytes_ > 256  # the binding's 256 bytes, then the library's (status word first)


# ---------------------------------------------------------------------------------------------
# Token level
# ---------------------------------------------------------------------------------------------


def token_inputs(b: dict, k: int):
    ls = torch.log_softmax(b["z"].double(), -1)
    lt = torch.log_softmax(b["u"].double(), -1)
    ids = b["ids"][..., None]
    p = ls.exp()
    out = dict(s=ls.gather(-1, ids)[..., 0], t=lt.gather(-1, ids)[..., 0], ent_s=-(p * ls).sum(-1),
               ent_t=-(lt.exp() * lt).sum(-1), rkl=(p * (ls - lt)).sum(-1))  # fmt: skip
    tk_lp, tk_ids = torch.topk(lt, k, -1)
    out.update(topk_ids=tk_ids, topk_teacher=tk_lp, topk_student=ls.gather(-1, tk_ids))
    g = torch.Generator().manual_seed(1)
    out["topk_student_old"] = out["topk_student"] + 0.2 * torch.randn(out["topk_student"].shape, generator=g, dtype=torch.float64)
    return out


def run_tokens(cfg, x, device, dtype, *, step=0, packed=False):
    info = cfg.info
    s = x["s"].to(dtype).to(device).detach().clone().requires_grad_()  # never the batch's own tensors
    sk = x["topk_student"].to(dtype).to(device).detach().clone().requires_grad_()
    on = lambda key: x[key].to(dtype).to(device)  # noqa: E731
    kw = dict(objective=cfg, old_logprobs=on("s_old"), seed=7, step=step)
    if packed:
        kw["seq_offsets"] = x["seq_offsets"].to(device)
    if info["needs_topk"]:
        kw.update(student_topk_logprobs=sk, teacher_topk_ids=x["topk_ids"].to(device), teacher_topk_logprobs=on("topk_teacher"),
                  old_topk_logprobs=on("topk_student_old"))  # fmt: skip
    for need, key, arg in (("needs_student_entropy", "ent_s", "student_entropy"), ("needs_teacher_entropy", "ent_t", "teacher_entropy"),
                           ("needs_rkl", "rkl", "rkl"), ("needs_ref", "ref", "ref_logprobs")):  # fmt: skip
        if info[need]:
            kw[arg] = on(key)
    loss, diag = tt.distill_loss_from_logprobs(s, on("t"), x["origin"].to(device), **kw)
    loss.backward()
    gk = sk.grad.cpu() if sk.grad is not None else None
    return loss.detach().cpu(), s.grad.cpu(), gk, {k: v.cpu() for k, v in diag.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name,cfg,extra", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_tokens_match_cpu_and_reference(name, cfg, extra, layout, dtype):
    needs_cuda_build()
    b = padded_batch(seed=21)
    x = token_inputs(b, 4)
    x.update(origin=b["origin"], s_old=b["s_old"], ref=b["ref"])
    if layout == "packed":
        x = to_packed(x, [8, 6, 3])
    step = extra.get("step", 0)
    loss_g, gs_g, gk_g, diag_g = run_tokens(cfg, x, "cuda", dtype, step=step, packed=layout == "packed")
    loss_c, gs_c, gk_c, diag_c = run_tokens(cfg, x, "cpu", dtype, step=step, packed=layout == "packed")
    # The same inputs: the same decisions; double arithmetic on both sides, sums in another order.
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.equal(diag_g["flags"], diag_c["flags"])
    torch.testing.assert_close(loss_g, loss_c, rtol=tol, atol=tol)
    torch.testing.assert_close(gs_g, gs_c, rtol=tol, atol=tol)
    if cfg.info["needs_topk"]:
        torch.testing.assert_close(gk_g, gk_c, rtol=tol, atol=tol)
    close_stats(diag_g, diag_c, rtol=tol, atol=tol)
    # Against the float64 reference on the same (dtype-rounded) inputs.
    n = x["s"].numel()
    offs = x["seq_offsets"].tolist() if layout == "packed" else list(range(0, n + 1, x["s"].shape[1]))
    r = lambda key, *shape: x[key].to(dtype).double().reshape(n, *shape)  # noqa: E731
    rs = r("s").clone().requires_grad_()
    rk = r("topk_student", -1).clone().requires_grad_()
    ref = objective_loss(cfg, rs, r("t"), x["origin"].reshape(n), offs, s_old=r("s_old"), ent_s=r("ent_s"), ent_t=r("ent_t"),
                         rkl=r("rkl"), ref=r("ref"), topk_teacher=r("topk_teacher", -1), topk_student=rk,
                         topk_student_old=r("topk_student_old", -1), trusted_given=trusted_from(diag_g), step=step)  # fmt: skip
    ref.backward()
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss_g.double(), ref.detach(), rtol=rtol, atol=rtol)
    torch.testing.assert_close(gs_g.double().reshape(n), rs.grad, rtol=rtol, atol=rtol)


# ---------------------------------------------------------------------------------------------
# Errors: the CPU path's exceptions, codes, rows and columns
# ---------------------------------------------------------------------------------------------


def same_error(make):
    """Runs make(device) on both devices: the same exception class, code, row and column."""
    errors = {}
    for device in ("cpu", "cuda"):
        with pytest.raises(tropd.TropdError) as e:
            make(device)
        errors[device] = e.value
    c, g = errors["cpu"], errors["cuda"]
    assert type(g) is type(c), (c, g)
    assert (g.code, g.row, g.column, g.sequence, g.position) == (c.code, c.row, c.column, c.sequence, c.position), (str(c), str(g))
    return g


def test_errors_match_the_cpu_path():
    needs_cuda_build()
    b = padded_batch(B=2, T=6, V=11, seed=51)

    def call(device, z=None, ids=None, objective=None, **kw):
        z = (b["z"] if z is None else z).float().to(device)
        return tt.distill_loss(z, (b["ids"] if ids is None else ids).to(device), b["origin"].to(device),
                               objective=objective or tropd.presets.opd(), teacher_logits=b["u"].float().to(device), **kw)  # fmt: skip

    ids = b["ids"].clone()
    ids[1, 4] = 11  # V = 11
    e = same_error(lambda d: call(d, ids=ids))
    assert isinstance(e, tropd.InvalidInputError) and e.code == "id_out_of_range"
    z = b["z"].clone()
    z[1, 3, 5] = math.nan
    e = same_error(lambda d: call(d, z=z))
    assert isinstance(e, tropd.EvaluationError) and e.code == "non_finite_input"
    # mask_bad_input: the NaN row is dropped on both devices.
    lg, dg = call("cuda", z=z, mask_bad_input=True)
    lc, dc = call("cpu", z=z, mask_bad_input=True)
    torch.testing.assert_close(lg.cpu(), lc, rtol=1e-5, atol=1e-6)
    assert dg["n_masked_input"].item() == dc["n_masked_input"].item() == 1
    # A bad parameter is a ValueError before anything runs.
    with pytest.raises(ValueError):
        call("cuda", objective=tropd.presets.opd(), normaliser=-1.0)


def test_unsupported_cases_are_clear():
    needs_cuda_build()
    b = padded_batch(seed=61)
    x = token_inputs(b, 4)
    # GKD at token level: a full-vocabulary term needs logits (the CPU path's error too).
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="full-vocabulary term"):
            tt.distill_loss_from_logprobs(x["s"].to(device), x["t"].to(device), b["origin"].to(device), objective=tropd.presets.gkd())
    # A top-k wider than the device backend's 1024: NotImplementedError (the CPU path takes it).
    n, V = 4, 1100
    z = torch.randn(n, V)
    args = (torch.zeros(n, dtype=torch.int64), torch.full((n,), tropd.STUDENT))
    with pytest.raises(NotImplementedError, match="1024"):
        tt.distill_loss(z.cuda(), *(a.cuda() for a in args), objective=tropd.presets.tropd(k=1050), teacher_logits=z.cuda() + 1)
    tt.distill_loss(z, *args, objective=tropd.presets.tropd(k=1050), teacher_logits=z + 1)


def test_torch_compile_fullgraph():
    needs_cuda_build()
    b = padded_batch(seed=41)
    cfg = tropd.presets.tropd(k=4, beta=0.05)

    def f(z, u, ids, origin):
        loss, _ = tt.distill_loss(z, ids, origin, objective=cfg, teacher_logits=u, seed=2)
        return loss

    z = b["z"].float().cuda().requires_grad_()
    args = (b["u"].float().cuda(), b["ids"].cuda(), b["origin"].cuda())
    loss = torch.compile(f, fullgraph=True)(z, *args)
    loss.backward()
    z2 = z.detach().clone().requires_grad_()
    loss2 = f(z2, *args)
    loss2.backward()
    torch.testing.assert_close(loss, loss2, rtol=0, atol=0)
    torch.testing.assert_close(z.grad, z2.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Builds and devices
# ---------------------------------------------------------------------------------------------


def test_cpu_only_build_refuses_cuda():
    if tropd.cuda_compiled:
        pytest.skip("this build has the CUDA dispatch (the tests above run it)")
    b = padded_batch(seed=71, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA build"):
        tt.distill_loss(b["z"].cuda(), b["ids"].cuda(), b["origin"].cuda(), objective=tropd.presets.opd(), teacher_logits=b["u"].cuda())


def test_cpu_and_cuda_tensors_mixed_is_a_value_error():
    b = padded_batch(seed=72, dtype=torch.float32)
    with pytest.raises(ValueError, match="same device"):
        tt.distill_loss(b["z"].cuda(), b["ids"], b["origin"], objective=tropd.presets.opd(), teacher_logits=b["u"].cuda())


def test_fused_lm_head_on_cuda_is_not_implemented():
    """The fused head has no device binding (include/tropd/gpu/fused_lm_head.cuh is not bound):
    CUDA tensors raise NotImplementedError, from the public function and from the op itself."""
    g = torch.Generator().manual_seed(72)
    h, W = torch.randn(4, 3, generator=g).cuda(), torch.randn(5, 3, generator=g).cuda()
    ids, origin = torch.tensor([0, 1, 2, 3]).cuda(), torch.full((4,), tropd.STUDENT).cuda()
    with pytest.raises(NotImplementedError, match="CPU tensors only"):
        tt.fused_linear_distill_loss(h, W, ids, origin, objective=tropd.presets.opd(), teacher_logits=h @ W.T)
    with pytest.raises(NotImplementedError, match="no CUDA entry point"):
        torch.ops.tropd.fused_lm_head(h, W, None, None, None, None, h @ W.T, None, ids.int(), origin.to(torch.uint8),
                                      torch.tensor([0, 4]).cuda(), None, None, None, None, None, None, None,
                                      tropd.presets.opd().spec(), 0, 0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0, 1 << 20, False,
                                      False, False, False)  # fmt: skip
