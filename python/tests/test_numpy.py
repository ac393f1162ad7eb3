"""The compiled module works on numpy arrays too (DLPack / the buffer protocol, no torch):
the framework-neutral tropd.evaluate_rows / evaluate_tokens agree with the torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tropd
import tropd.torch as tt
from helpers import padded_batch


def test_numpy_rows_equal_torch():
    b = padded_batch(B=2, T=5, V=9, seed=61, dtype=torch.float32)
    n, V = 10, 9
    cfg = tropd.presets.tropd(k=3, beta=0.05)
    z = b["z"].reshape(n, V).numpy()
    grad = np.empty((n, V), dtype=np.float32)
    flags = np.empty(n, dtype=np.uint8)
    loss, diag = tropd.evaluate_rows(cfg, z, b["ids"].reshape(n).numpy().astype(np.int32),
                                     b["origin"].reshape(n).numpy().astype(np.uint8), np.array([0, 5, 10], dtype=np.int64),
                                     teacher_logits=b["u"].reshape(n, V).numpy(), grad=grad, flags=flags, seed=4)  # fmt: skip
    zt = b["z"].clone().requires_grad_()
    lt, dt = tt.distill_loss(zt, b["ids"], b["origin"], objective=cfg, teacher_logits=b["u"], seed=4)
    lt.backward()
    assert loss == pytest.approx(lt.item(), rel=1e-6)
    assert diag["trust_fraction"] == pytest.approx(dt["trust_fraction"].item())
    np.testing.assert_allclose(grad, zt.grad.reshape(n, V).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(flags, dt["flags"].reshape(n).numpy())


def test_numpy_tokens_and_errors():
    s = np.log(np.array([0.5, 0.25, 0.125, 0.5]))
    t = np.log(np.array([0.4, 0.3, 0.125, 0.5]))
    origin = np.array([0, 2, 2, 1], dtype=np.uint8)
    offs = np.array([0, 4], dtype=np.int64)
    dlds = np.empty(4)
    loss, diag = tropd.evaluate_tokens(tropd.presets.opd(), s, t, origin, offs, dloss_ds=dlds)
    # OPD, token mean over the 2 student tokens: L = -(t - s) with rho = 1.
    assert loss == pytest.approx(-((t[1] - s[1]) + (t[2] - s[2])) / 2)
    assert diag["n_student"] == 2
    np.testing.assert_allclose(dlds, [0, -(t[1] - s[1]) / 2, -(t[2] - s[2]) / 2, 0])
    with pytest.raises(ValueError, match="must be contiguous"):
        tropd.evaluate_tokens(tropd.presets.opd(), np.repeat(s, 2)[::2], t, origin, offs)
    with pytest.raises(ValueError, match="must be uint8"):
        tropd.evaluate_tokens(tropd.presets.opd(), s, t, origin.astype(np.int32), offs)
    bad = t.copy()
    bad[2] = np.nan
    with pytest.raises(tropd.EvaluationError, match="teacher log-prob t is NaN") as e:
        tropd.evaluate_tokens(tropd.presets.opd(), s, bad, origin, offs)
    assert e.value.row == 2
