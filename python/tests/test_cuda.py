"""CUDA tensors (marked `cuda`: skipped where torch sees no GPU). A CPU-only build refuses them
with a ValueError; a build with TROPD_PYTHON_CUDA=ON runs the device path, which must agree with
the CPU (today it raises NotImplementedError: the headers have no device objective entry point
yet, see python/src/gpu.hpp)."""

from __future__ import annotations

import pytest
import torch

import tropd
import tropd.torch as tt
from helpers import padded_batch

pytestmark = pytest.mark.cuda


def _call(b, device):
    z = b["z"].to(device).requires_grad_()
    loss, diag = tt.distill_loss(z, b["ids"].to(device), b["origin"].to(device), objective=tropd.presets.tropd(k=4),
                                 teacher_logits=b["u"].to(device), old_logprobs=b["s_old"].to(device), seed=3)  # fmt: skip
    loss.backward()
    return loss, z.grad, diag


def test_cuda_matches_cpu_or_is_refused_clearly():
    b = padded_batch(seed=71, dtype=torch.float32)
    if not tropd.cuda_compiled:
        with pytest.raises(ValueError, match="CUDA build"):
            _call(b, "cuda")
        return
    try:
        loss_g, grad_g, diag_g = _call(b, "cuda")
    except NotImplementedError:
        pytest.skip("the device objective entry points are not bound in this version")
    loss_c, grad_c, diag_c = _call(b, "cpu")
    torch.testing.assert_close(loss_g.cpu(), loss_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_g.cpu(), grad_c, rtol=1e-4, atol=1e-6)
    assert torch.equal(diag_g["flags"].cpu(), diag_c["flags"])


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
