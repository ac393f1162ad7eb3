"""Random batches for the tests (small shapes: the V = 151936 runs are the benchmark's)."""

from __future__ import annotations

import math

import torch

import tropd
from tropd import presets

PROMPT, TEACHER, STUDENT = tropd.PROMPT, tropd.TEACHER, tropd.STUDENT

# (name, config, extra) for every preset, with knobs that exercise both sides of each rule on the
# random batches below (e.g. thresholds inside the range of R = t - s_old).
PRESET_CASES = [
    ("opd", presets.opd(), {}),
    ("opd_clipped", presets.opd(eps_low=0.2, eps_high=0.28, dual_clip=3.0, adv_low=-2.0, adv_high=2.5), {}),
    ("eopd", presets.eopd(k=4, tau=2.0), {}),
    ("reopold_phase1", presets.reopold(floor=-1.0), {"step": 3}),
    ("reopold_phase2", presets.reopold(floor=-1.0, switch_step=2), {"step": 3}),
    ("entropy_opd", presets.entropy_opd(fraction=0.3), {}),
    ("clip_outlier", presets.clip_outlier(tau=-1.0, guidance_beta=0.05), {}),
    ("mask_outlier", presets.mask_outlier(tau=-1.0), {}),
    ("fkl_outlier_c", presets.fkl_outlier(k=4), {}),
    ("fkl_outlier_p_tail", presets.fkl_outlier(k=4, form="p", tail="tail_bucket"), {}),
    ("tropd", presets.tropd(k=4, beta=0.05), {}),
    ("tropd_p_raw_pg", presets.tropd(k=4, form="p", tail="raw", guidance="pg", beta=0.05), {}),
    ("tropd_c_clamp", presets.tropd(k=4, clamp=0.3, beta=0.05, eps_low=0.2, eps_high=0.2), {}),
    ("gkd", presets.gkd(beta=0.3), {}),
    ("gkd_forward", presets.gkd(beta=0.0), {}),
    ("vopd", presets.vopd(), {}),
    ("gopd", presets.gopd(lambda_=1.5), {}),
]


def sample_ids(z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Tokens sampled from softmax(z) per row (the student's samples)."""
    p = torch.softmax(z.double().reshape(-1, z.shape[-1]), -1)
    return torch.multinomial(p, 1, generator=g).reshape(z.shape[:-1])


def padded_batch(B=3, T=8, V=13, seed=0, dtype=torch.float64, scale=2.0, noise=1.5):
    """Student / teacher logits [B, T, V], sampled ids, origin tags (2 prompt positions per row, a
    2-token teacher prefix in row 0), rollout-time log-probs s_old (shifted: rho != 1) and
    reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    u = z + noise * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = sample_ids(z, g)
    origin = torch.full((B, T), STUDENT, dtype=torch.int64)
    origin[:, :2] = PROMPT
    origin[0, 2:4] = TEACHER
    s = torch.log_softmax(z, -1).gather(-1, ids[..., None])[..., 0]
    s_old = s + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = torch.log_softmax(z + torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(-1, ids[..., None])[..., 0]
    return dict(z=z.to(dtype), u=u.to(dtype), ids=ids, origin=origin, s_old=s_old, ref=ref)


def to_packed(b: dict, lengths):
    """The padded batch as a packed one: row j keeps its first lengths[j] positions."""
    offs = [0]
    for L in lengths:
        offs.append(offs[-1] + L)
    out = {}
    for key, v in b.items():
        out[key] = torch.cat([v[j, :L] for j, L in enumerate(lengths)], dim=0)
    out["seq_offsets"] = torch.tensor(offs, dtype=torch.int64)
    return out


def topk_lists(u: torch.Tensor, k: int, pad: int = 0, shift: float = 0.0, seed: int = 0):
    """Served-teacher lists from teacher logits [..., V]: the top-(k - pad) log-probs in a
    shuffled order, `pad` entries of -inf padding, every finite entry shifted by `shift`
    (an unnormalised list)."""
    lt = torch.log_softmax(u.double(), -1)
    lp, ids = torch.topk(lt, k - pad, dim=-1)
    lp = lp + shift
    if pad:
        lp = torch.cat([lp, torch.full(lp.shape[:-1] + (pad,), -math.inf, dtype=lp.dtype)], -1)
        ids = torch.cat([ids, torch.full(ids.shape[:-1] + (pad,), 7, dtype=ids.dtype)], -1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(lp.shape, generator=g), dim=-1)
    return ids.gather(-1, perm), lp.gather(-1, perm)


def trusted_from(diag: dict) -> torch.Tensor:
    return (diag["flags"].reshape(-1) & tropd.torch.FLAG_BITS["trusted"]) != 0
