"""Pure-PyTorch float64 references of tropd's objectives, written from method.md (the project
brief's mathematical reference), not from the C++: sections cited per formula.

Everything works on flattened arrays (n tokens, CSR sequence offsets) and returns a loss whose
autograd gives the gradient to compare with tropd's. Stochastic decisions (TrOPD's trust
region, method.md 4.2) are the one input taken from tropd (its per-token flags): the tests check
the rule they follow separately.
"""

from __future__ import annotations

import math

import torch

PROMPT, TEACHER, STUDENT = 0, 1, 2


def pg_term(A, s, s_old, eps_low=math.inf, eps_high=math.inf, dual_c=0.0, adv_lo=-math.inf, adv_hi=math.inf):
    """The PG surrogate of method.md 1 and 3: L = -rho A with rho = exp(s - s_old), PPO clipping
    of rho to [1 - eps_low, 1 + eps_high] (the pessimistic max), the dual clip min(L, -c A) for
    A < 0, and an advantage clip A in [adv_lo, adv_hi]."""
    A = A.clamp(adv_lo, adv_hi)
    rho = torch.exp(s - s_old)
    L = -rho * A
    if math.isfinite(eps_low) or math.isfinite(eps_high):
        rc = rho.clamp(1 - eps_low if math.isfinite(eps_low) else -math.inf, 1 + eps_high if math.isfinite(eps_high) else math.inf)
        L = torch.maximum(L, -rc * A)
    if dual_c > 1:
        L = torch.where(A < 0, torch.minimum(L, -dual_c * A), L)
    return L


def topk_fkl(lq, ls, tail: str):
    """Top-k forward KL on the teacher's support (method.md 2.3), one row per token.
    lq: teacher log-probs at the K ids (-inf: padding), ls: the student's full-vocabulary
    log-probs at the same ids, shapes [m, K]."""
    valid = lq > -math.inf
    lq0 = torch.where(valid, lq, torch.zeros_like(lq))
    ls0 = torch.where(valid, ls, torch.zeros_like(ls))
    log_S = torch.logsumexp(torch.where(valid, lq, torch.full_like(lq, -math.inf)), dim=-1, keepdim=True)
    if tail == "renormalised":
        lqn = lq0 - log_S  # qk = q / S_K
        terms = torch.exp(lqn) * (lqn - ls0)
        return torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)
    q = torch.exp(lq0)
    terms = torch.where(valid, q * (lq0 - ls0), torch.zeros_like(q))
    val = terms.sum(-1)
    if tail == "raw":
        return val
    assert tail == "tail_bucket"
    S = torch.where(valid, q, torch.zeros_like(q)).sum(-1)
    P = torch.where(valid, torch.exp(ls0), torch.zeros_like(q)).sum(-1)
    tail_t = 1 - S
    return val + torch.where(tail_t > 1e-6, tail_t * torch.log(tail_t / (1 - P)), torch.zeros_like(val))


def jsd(ls, lt, beta):
    """Generalised JSD(beta) per row (method.md 2.2): beta KL(q || m) + (1 - beta) KL(p || m),
    log m by log-sum-exp; beta = 0 is forward KL, beta = 1 reverse KL."""
    p, q = torch.exp(ls), torch.exp(lt)

    def kl(a, la, lb):  # sum a (la - lb), 0 where a = 0
        return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)

    if beta == 0:
        return kl(q, lt, ls)
    if beta == 1:
        return kl(p, ls, lt)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
    return beta * kl(q, lt, lm) + (1 - beta) * kl(p, ls, lm)


def aggregate(L, counted, kept, offsets, mode, constant=1.0, normaliser=None):
    """Aggregation modes (method.md 8): the weighted sum of per-token losses."""
    L = torch.where(counted, L, torch.zeros_like(L))
    if mode in ("token_mean", "kept_token_mean", "sum_over_constant"):
        if mode == "token_mean":
            den = float(counted.sum())
        elif mode == "kept_token_mean":
            den = float((kept & counted).sum())
        else:
            den = constant
        den = normaliser if normaliser else den
        return L.sum() / den if den > 0 else L.sum() * 0
    parts, n_seq = [], 0
    for j in range(len(offsets) - 1):
        a, b = offsets[j], offsets[j + 1]
        c = float(counted[a:b].sum())
        if c == 0:
            continue
        n_seq += 1
        parts.append(L[a:b].sum() / (c if mode == "seq_mean_token_mean" else 1.0))
    den = normaliser if normaliser else n_seq
    return sum(parts) / den if den > 0 else L.sum() * 0


def objective_loss(cfg, s, t, origin, offsets, *, s_old=None, ent_s=None, ent_t=None, rkl=None, ref=None,
                   topk_teacher=None, topk_student=None, topk_student_old=None, trusted_given=None, step=0,
                   normaliser=None, dense=None):  # fmt: skip
    """The per-token objective of method.md 3-6 composed as in section 4.1 and aggregated as in 8.

    s, t: [n] log p_S(y) (differentiable), log p_T(y); s_old: rollout-time log p_S (default: s
    detached); ent_s / ent_t: full-vocabulary entropies; rkl: the per-position KL(p_S || p_T);
    topk_*: [n, K] the teacher's top-k log-probs and the student's at those ids; dense: [n] a
    full-vocabulary divergence per token (GKD); trusted_given: the trust mask of a stochastic
    region (TrOPD's M)."""
    p = cfg.preset
    n = s.shape[0]
    s_old = s.detach() if s_old is None else s_old
    R = t - s_old  # method.md 1: the detached log-ratio reward
    student = origin == STUDENT
    teacher = origin == TEACHER
    clip = dict(eps_low=getattr(cfg, "eps_low", math.inf), eps_high=getattr(cfg, "eps_high", math.inf),
                dual_c=getattr(cfg, "dual_clip", 0.0))  # fmt: skip
    zero = torch.zeros_like(s)

    # The region (method.md 4.2, 4.3, 5).
    if p in ("opd", "vopd", "gopd", "gkd"):
        trusted = torch.ones(n, dtype=torch.bool)
    elif p == "eopd":
        trusted = ~(ent_t > cfg.tau)
    elif p in ("clip_outlier", "mask_outlier"):
        trusted = R > cfg.tau
    elif p in ("entropy_opd", "reopold"):
        fraction = cfg.fraction if p == "entropy_opd" else cfg.entropy_fraction
        if p == "reopold" and step < cfg.switch_step:
            trusted = R >= cfg.floor  # phase I: keep R >= floor
        else:
            h = ent_s[student]
            keep = max(1, math.ceil(fraction * h.numel() - 1e-9))
            thr = torch.sort(h, descending=True).values[min(keep, h.numel()) - 1]
            trusted = ent_s >= thr  # the top fraction of the batch's student tokens by H_S
    elif p in ("fkl_outlier", "tropd"):
        trusted = trusted_given
    else:
        raise ValueError(p)

    # The trust term's advantage.
    if p == "vopd":
        A_trust = R + rkl  # method.md 6
    elif p == "gopd":
        A_trust = cfg.lambda_ * (t - ref) - (s_old - ref)
    else:
        A_trust = R  # k1 as a PG reward (OPD)
    adv = dict(adv_lo=getattr(cfg, "adv_low", -math.inf), adv_hi=getattr(cfg, "adv_high", math.inf))
    if p == "reopold":
        adv = dict(adv_lo=cfg.floor)  # A = max(R, floor)

    L = zero.clone()
    kept = torch.zeros(n, dtype=torch.bool)
    counted = student.clone()
    if p == "gkd":
        L = dense
        counted = student | teacher
        kept = counted
    else:
        trust_applies = student & (trusted | torch.tensor(p == "eopd"))  # EOPD adds, the others replace
        Lt = pg_term(torch.where(trust_applies, A_trust, zero), s, s_old, **clip, **adv)
        L = torch.where(trust_applies, Lt, L)
        kept = kept | trust_applies
        out = student & ~trusted
        if p == "clip_outlier":
            Lo = pg_term(torch.clamp(R, min=cfg.tau), s, s_old, **clip)
            L = torch.where(out, Lo, L)
            kept = kept | out
        elif p in ("fkl_outlier", "tropd", "eopd"):
            form = "p" if p == "eopd" else cfg.form
            rows = out.nonzero().flatten()
            if rows.numel():
                if form == "p":
                    fk = topk_fkl(topk_teacher[rows], topk_student[rows], cfg.tail)
                    Lo = zero.index_put((rows,), fk)
                else:
                    old = topk_student.detach() if topk_student_old is None else topk_student_old
                    A = -topk_fkl(topk_teacher[rows], old[rows], cfg.tail)
                    if math.isfinite(cfg.clamp):
                        A = A.clamp(min=-cfg.clamp)
                    Ao = zero.detach().index_put((rows,), A.detach())
                    Lo = pg_term(Ao, s, s_old, **clip)
                L = torch.where(out, L + Lo, L)
                kept = kept | out
        # mask_outlier, entropy_opd, reopold: outliers are dropped (A = 0, not kept)
        beta = {"tropd": getattr(cfg, "beta", 0.0)}.get(p, getattr(cfg, "guidance_beta", 0.0))
        if beta > 0:  # off-policy guidance on teacher-prefix tokens (method.md 4.1, 10.3)
            if getattr(cfg, "guidance", "sft") == "sft":
                Lg = -beta * s
            else:
                Lg = -torch.exp(s - s_old) * (beta * (t - s_old))
            L = torch.where(teacher, Lg, L)
            counted = counted | teacher
            kept = kept | teacher
    return aggregate(L, counted, kept, offsets, cfg.aggregation, cfg.aggregation_constant, normaliser)


def row_loss(cfg, z, ids, origin, offsets, *, u=None, t=None, topk_ids=None, topk_lp=None, s_old=None,
             old_topk=None, ref=None, trusted_given=None, step=0, Ts=1.0, Tt=1.0, normaliser=None):  # fmt: skip
    """The row-level objective from student logits z [n, V] (differentiable) and the teacher as
    logits u [n, V] or token log-probs t [n] (+ top-k lists). Temperatures divide the logits
    (method.md 2.2). The teacher's top-k are TopK_T(k) of its logits unless lists are given."""
    ls = torch.log_softmax(z / Ts, dim=-1)
    s = ls.gather(1, ids.long()[:, None])[:, 0]
    p = torch.exp(ls).detach()
    ent_s = -(p * ls.detach()).sum(-1)
    ent_t = rkl = dense = None
    if u is not None:
        lt = torch.log_softmax(u / Tt, dim=-1)
        t = lt.gather(1, ids.long()[:, None])[:, 0]
        q = torch.exp(lt)
        ent_t = -torch.where(q > 0, q * lt, torch.zeros_like(q)).sum(-1)
        rkl = torch.where(p > 0, p * (ls.detach() - lt), torch.zeros_like(p)).sum(-1)
        if cfg.preset == "gkd":
            dense = jsd(ls, lt, cfg.beta)
    topk_teacher = topk_student = None
    k = getattr(cfg, "k", 0)
    if cfg.preset in ("tropd", "fkl_outlier", "eopd"):
        if topk_ids is None:
            topk_teacher, topk_ids = torch.topk(lt, min(k, lt.shape[1]), dim=-1)
        else:
            topk_teacher = topk_lp
        topk_student = ls.gather(1, topk_ids.long().clamp(min=0))
    return objective_loss(cfg, s, t, origin, offsets, s_old=s_old, ent_s=ent_s, ent_t=ent_t, rkl=rkl, ref=ref,
                          topk_teacher=topk_teacher, topk_student=topk_student, topk_student_old=old_topk,
                          trusted_given=trusted_given, step=step, normaliser=normaliser, dense=dense)  # fmt: skip
