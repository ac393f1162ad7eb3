"""Objective configs: one frozen dataclass per preset of tropd/objective/presets.hpp.

Each class mirrors the C++ preset's config struct (same field names and defaults; G-OPD's
``lambda`` is ``lambda_`` here) plus the objective fields the package exposes on every preset:
``aggregation`` / ``aggregation_constant`` (tropd/aggregation/aggregation.hpp) and, where the
objective has a policy-gradient clip, ``eps_low`` / ``eps_high`` (PPO ratio clip, ``inf`` = off)
and ``dual_clip`` (0 = off, else > 1). The lowercase functions are the C++ preset functions::

    obj = tropd.presets.tropd(k=64, beta=1e-3)            # TropdConfig(k=64, beta=0.001, ...)
    obj = tropd.presets.tropd(form="p", tail="tail_bucket")
    obj = dataclasses.replace(obj, aggregation="seq_mean_token_mean")

A config is validated by the C++ code when it is built (ValueError for a bad value) and
travels to the compiled module as a short text spec (``obj.spec()``). The external normaliser
(a global token count), the temperatures, the seed and the step are arguments of each call,
not of the config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from . import _C

__all__ = [
    "Objective",
    "OpdConfig",
    "EopdConfig",
    "ReopoldConfig",
    "EntropyOpdConfig",
    "ClipOutlierConfig",
    "MaskOutlierConfig",
    "FklOutlierConfig",
    "TropdConfig",
    "GkdConfig",
    "VopdConfig",
    "GopdConfig",
    "opd",
    "eopd",
    "reopold",
    "entropy_opd",
    "clip_outlier",
    "mask_outlier",
    "fkl_outlier",
    "tropd",
    "gkd",
    "vopd",
    "gopd",
    "reopold_floor_ratio",
    "reopold_floor_logit",
    "PRESETS",
]

inf = math.inf

Aggregation = Literal["token_mean", "kept_token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "sum_over_constant"]
TopkTail = Literal["renormalised", "raw", "tail_bucket"]
FklForm = Literal["c", "p"]
GuidanceForm = Literal["sft", "pg"]


def _fmt(v) -> str:
    if isinstance(v, bool):
        raise TypeError("tropd: boolean config values are not used")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # 'inf', '-inf', shortest round-trip digits
    return str(v)


@dataclass(frozen=True)
class Objective:
    """Base of the preset configs: ``spec()`` (the text the compiled module parses) and
    ``info`` (what the objective reads: top-k width, teacher logits, entropies, ...)."""

    preset: ClassVar[str] = ""
    _renamed: ClassVar[dict] = {}

    def __post_init__(self):
        # The C++ objective's check(): a bad value is a ValueError now, not at the first call.
        object.__setattr__(self, "_info", _C.objective_info(self.spec()))

    def spec(self) -> str:
        parts = [self.preset]
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            parts.append(f"{self._renamed.get(f.name, f.name)}={_fmt(getattr(self, f.name))}")
        return ";".join(parts)

    @property
    def info(self) -> dict:
        """What the objective reads: ``needs_topk``, ``k`` (the top-k width), ``needs_teacher_logits``
        (reads the teacher's full distribution), ``needs_student_entropy``, ``needs_teacher_entropy``,
        ``needs_rkl``, ``needs_ref``, ``has_dense`` (a full-vocabulary term: logits only)."""
        return dict(self._info)


@dataclass(frozen=True)
class _Aggregated(Objective):
    aggregation: Aggregation = "token_mean"
    aggregation_constant: float = 1.0  # C of sum_over_constant


@dataclass(frozen=True)
class _Clipped(_Aggregated):
    eps_low: float = inf  # PPO clip: rho >= 1 - eps_low (0.2 typical); inf = off
    eps_high: float = inf  # PPO clip: rho <= 1 + eps_high (0.2, or 0.28 "clip-higher"); inf = off
    dual_clip: float = 0.0  # dual clip constant (> 1, e.g. 3); 0 = off


@dataclass(frozen=True)
class OpdConfig(_Clipped):
    """OPD: A = t - s_old on every student token, PG surrogate -rho A, token mean; no clip by default."""

    preset: ClassVar[str] = "opd"
    adv_low: float = -inf  # advantage clip A >= adv_low
    adv_high: float = inf  # advantage clip A <= adv_high


@dataclass(frozen=True)
class EopdConfig(_Clipped):
    """EOPD: PPO-clipped K1 on every student token plus I[H_T > tau] FKL_k (form P, added).
    Reads the teacher's full-vocabulary entropy: teacher logits (row level) or teacher_entropy."""

    preset: ClassVar[str] = "eopd"
    tau: float = 0.8  # teacher-entropy gate, nats
    k: int = 16  # top-k of the forward-KL term
    eps_low: float = 0.2
    eps_high: float = 0.2
    tail: TopkTail = "renormalised"


@dataclass(frozen=True)
class ReopoldConfig(_Clipped):
    """REOPOLD: A = max(R, floor), mean over kept tokens; phase I keeps R >= floor, phase II
    (step >= switch_step) the top entropy_fraction of student tokens by student entropy."""

    preset: ClassVar[str] = "reopold"
    floor: float = -2.0  # reward floor (tropd's default, about reopold_floor_ratio(0.2))
    switch_step: int = 100  # first step of phase II
    entropy_fraction: float = 0.2
    aggregation: Aggregation = "kept_token_mean"


@dataclass(frozen=True)
class EntropyOpdConfig(_Clipped):
    """Entropy OPD: A = I[H_S in the batch's top fraction] R (the others count, with A = 0)."""

    preset: ClassVar[str] = "entropy_opd"
    fraction: float = 0.2


@dataclass(frozen=True)
class ClipOutlierConfig(_Clipped):
    """Clip outlier: A = max(R, tau); guidance_beta > 0 adds off-policy guidance (TrOPD variant: 1e-3)."""

    preset: ClassVar[str] = "clip_outlier"
    tau: float = -5.0  # static threshold (unpublished in the paper; tropd's default)
    guidance_beta: float = 0.0


@dataclass(frozen=True)
class MaskOutlierConfig(_Clipped):
    """Mask outlier: A = R if R > tau, else the token is dropped (still counted by token_mean)."""

    preset: ClassVar[str] = "mask_outlier"
    tau: float = -5.0
    guidance_beta: float = 0.0


@dataclass(frozen=True)
class FklOutlierConfig(_Clipped):
    """FKL outlier: the stochastic trust region, top-k forward KL on outliers, no guidance."""

    preset: ClassVar[str] = "fkl_outlier"
    k: int = 64  # top-k of the outlier term (= the width of given teacher top-k lists)
    form: FklForm = "c"  # C: A = -FKL_k as a detached PG advantage (authors' code); P: the differentiable FKL_k
    clamp: float = inf  # form C: A >= -clamp (inf = off)
    tail: TopkTail = "renormalised"


@dataclass(frozen=True)
class TropdConfig(_Clipped):
    """TrOPD: stochastic trust region (accept iff log U <= t - s_old), form-C top-64 forward KL on
    outliers (renormalised teacher top-k), off-policy guidance -beta log p_S on teacher-prefix
    tokens, token mean."""

    preset: ClassVar[str] = "tropd"
    beta: float = 1e-3  # off-policy guidance weight
    k: int = 64
    form: FklForm = "c"
    clamp: float = inf
    tail: TopkTail = "renormalised"
    guidance: GuidanceForm = "sft"  # sft: -beta s; pg: A = beta (t - s_old)


@dataclass(frozen=True)
class GkdConfig(_Aggregated):
    """GKD: full-vocabulary generalised JSD(beta) on every non-prompt token (teacher logits only)."""

    preset: ClassVar[str] = "gkd"
    beta: float = 0.5  # 0: forward KL, 1: reverse KL


@dataclass(frozen=True)
class VopdConfig(_Clipped):
    """vOPD: A = R + KL_t with the detached per-position reverse KL (teacher logits, or rkl)."""

    preset: ClassVar[str] = "vopd"


@dataclass(frozen=True)
class GopdConfig(_Clipped):
    """G-OPD / ExOPD: A = lambda (t - ref) - (s_old - ref) (needs ref_logprobs)."""

    preset: ClassVar[str] = "gopd"
    _renamed: ClassVar[dict] = {"lambda_": "lambda"}
    lambda_: float = 1.25  # reward extrapolation (> 1)


PRESETS = {
    c.preset: c
    for c in (
        OpdConfig,
        EopdConfig,
        ReopoldConfig,
        EntropyOpdConfig,
        ClipOutlierConfig,
        MaskOutlierConfig,
        FklOutlierConfig,
        TropdConfig,
        GkdConfig,
        VopdConfig,
        GopdConfig,
    )
}


def opd(**kw) -> OpdConfig:
    """OPD (Thinking Machines / Tinker; GKD lambda = 1). Fields: see OpdConfig."""
    return OpdConfig(**kw)


def eopd(**kw) -> EopdConfig:
    """EOPD (arXiv 2603.07079). Fields: see EopdConfig."""
    return EopdConfig(**kw)


def reopold(**kw) -> ReopoldConfig:
    """REOPOLD (arXiv 2603.11137). Fields: see ReopoldConfig."""
    return ReopoldConfig(**kw)


def entropy_opd(**kw) -> EntropyOpdConfig:
    """Entropy OPD (the TrOPD paper's baseline). Fields: see EntropyOpdConfig."""
    return EntropyOpdConfig(**kw)


def clip_outlier(**kw) -> ClipOutlierConfig:
    """Clip outlier. Fields: see ClipOutlierConfig."""
    return ClipOutlierConfig(**kw)


def mask_outlier(**kw) -> MaskOutlierConfig:
    """Mask outlier. Fields: see MaskOutlierConfig."""
    return MaskOutlierConfig(**kw)


def fkl_outlier(**kw) -> FklOutlierConfig:
    """FKL outlier. Fields: see FklOutlierConfig."""
    return FklOutlierConfig(**kw)


def tropd(**kw) -> TropdConfig:
    """TrOPD (arXiv 2606.01249): k = 64, beta = 1e-3, form C, renormalised top-k. Fields: see TropdConfig."""
    return TropdConfig(**kw)


def gkd(**kw) -> GkdConfig:
    """GKD (full-vocabulary JSD(beta)). Fields: see GkdConfig."""
    return GkdConfig(**kw)


def vopd(**kw) -> VopdConfig:
    """vOPD (arXiv 2605.07865). Fields: see VopdConfig."""
    return VopdConfig(**kw)


def gopd(**kw) -> GopdConfig:
    """G-OPD / ExOPD (arXiv 2602.12125). Fields: see GopdConfig."""
    return GopdConfig(**kw)


def reopold_floor_ratio(lam: float) -> float:
    """REOPOLD's floor from lambda, written log(l) / (1 - l)."""
    return math.log(lam) / (1.0 - lam)


def reopold_floor_logit(lam: float) -> float:
    """REOPOLD's floor from lambda, written log(l / (1 - l))."""
    return math.log(lam / (1.0 - lam))
