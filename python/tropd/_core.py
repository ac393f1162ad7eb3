"""The framework-neutral calls: tropd's two entry points on numpy (or any DLPack) arrays.

Arrays are passed without a copy (dtype, rank, strides and device are checked: ValueError);
outputs are caller-allocated and written in place, and nothing is written when a call fails.
``tropd.torch`` is built on these two functions.
"""

from __future__ import annotations

from . import _C
from ._errors import raise_status

__all__ = ["evaluate_rows", "evaluate_tokens", "DIAGNOSTIC_NAMES", "PROMPT", "TEACHER", "STUDENT"]

#: Origin tags (tropd::origin): who produced the token at a position.
PROMPT, TEACHER, STUDENT = 0, 1, 2

#: The order of the float64 diagnostics vector both entry points write (tropd/objective/diagnostics.hpp).
DIAGNOSTIC_NAMES: tuple = tuple(_C.diagnostic_names())


def _spec(objective) -> str:
    return objective if isinstance(objective, str) else objective.spec()


def _default_outputs(loss, stats, like_f64: bool):
    import numpy as np

    own = stats is None
    if loss is None:
        loss = np.zeros((), dtype=np.float64 if like_f64 else np.float32)
    if stats is None:
        stats = np.zeros(len(DIAGNOSTIC_NAMES), dtype=np.float64)
    return loss, stats, own


def _summary(loss, stats):
    return float(loss), {name: float(v) for name, v in zip(DIAGNOSTIC_NAMES, stats.tolist())}


def evaluate_rows(
    objective,
    student_logits,
    token_ids,
    origin,
    seq_offsets,
    *,
    teacher_logits=None,
    teacher_token_logprobs=None,
    teacher_topk_ids=None,
    teacher_topk_logprobs=None,
    sequence_ids=None,
    old_logprobs=None,
    old_topk_logprobs=None,
    ref_logprobs=None,
    grad=None,
    loss=None,
    stats=None,
    flags=None,
    advantage=None,
    dloss_ds=None,
    seed: int = 0,
    step: int = 0,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    normaliser: float = 0.0,
    threads: int = 1,
    mask_bad_input: bool = False,
    scratch=None,
    stream: int = 0,
):
    """``tropd::host::evaluate_rows``: student logits [n, V] (fp32 / fp64 / bf16 / fp16, unit
    column stride, any row stride) with the teacher as logits [n, V] of the same dtype or as
    token log-probs [n] (+ top-k lists ``teacher_topk_ids`` int32 [n, K] and
    ``teacher_topk_logprobs`` [n, K], -inf padded); ``token_ids`` int32 [n], ``origin`` uint8 [n]
    (PROMPT / TEACHER / STUDENT), ``seq_offsets`` int64 [n_seq + 1].

    Outputs (optional, written in place): ``grad`` [n, V] dL/dz (float32; float64 for fp64
    logits), ``loss`` (one value), ``stats`` float64 [len(DIAGNOSTIC_NAMES)], ``flags`` uint8 [n],
    ``advantage`` and ``dloss_ds`` [n]. When ``stats`` is not given, returns
    ``(loss, {name: value})``; otherwise None. Raises InvalidInputError (a ValueError) or
    EvaluationError (a RuntimeError) for a failed status.

    CUDA arrays (the extension's CUDA build: ``tropd::gpu::evaluate_rows``): pass device ``loss``
    and ``stats``, ``scratch`` (a uint8 CUDA array of ``tropd._C.rows_scratch_bytes(...)`` bytes,
    the call's arguments less scratch and stream) and ``stream`` (a cudaStream_t as an integer).
    The call ends by reading its status word back (a sync of ``stream``; docs/python.md "CUDA").
    """
    loss, stats, own = _default_outputs(loss, stats, getattr(student_logits, "dtype", None) == "float64")
    st = _C.evaluate_rows(
        _spec(objective), student_logits, teacher_logits, teacher_token_logprobs, token_ids, origin, seq_offsets,
        sequence_ids, old_logprobs, ref_logprobs, teacher_topk_ids, teacher_topk_logprobs, old_topk_logprobs,
        grad, loss, stats, flags, advantage, dloss_ds, int(seed), int(step), float(student_temperature),
        float(teacher_temperature), float(normaliser), int(threads), bool(mask_bad_input), scratch, int(stream),
    )  # fmt: skip
    raise_status(st, seq_offsets)
    return _summary(loss, stats) if own else None


def evaluate_tokens(
    objective,
    student_logprobs,
    teacher_logprobs,
    origin,
    seq_offsets,
    *,
    sequence_ids=None,
    old_logprobs=None,
    student_entropy=None,
    teacher_entropy=None,
    rkl=None,
    ref_logprobs=None,
    teacher_topk_ids=None,
    teacher_topk_logprobs=None,
    student_topk_logprobs=None,
    old_topk_logprobs=None,
    loss=None,
    stats=None,
    dloss_ds=None,
    dloss_dtopk=None,
    flags=None,
    advantage=None,
    seed: int = 0,
    step: int = 0,
    normaliser: float = 0.0,
    mask_bad_input: bool = False,
    scratch=None,
    stream: int = 0,
):
    """``tropd::host::evaluate_tokens``: per-token log-probs [n] (fp32 / fp64) in; the loss,
    ``dloss_ds`` [n] (dL/ds: push it through your own log_softmax) and ``dloss_dtopk`` [n, K]
    (dL/d log p_S at the teacher's top-k ids) out. Same conventions as evaluate_rows (CUDA:
    the scratch size from ``tropd._C.tokens_scratch_bytes(...)``).
    """
    loss, stats, own = _default_outputs(loss, stats, getattr(student_logprobs, "dtype", None) == "float64")
    st = _C.evaluate_tokens(
        _spec(objective), student_logprobs, teacher_logprobs, origin, seq_offsets, sequence_ids, old_logprobs,
        student_entropy, teacher_entropy, rkl, ref_logprobs, teacher_topk_ids, teacher_topk_logprobs,
        student_topk_logprobs, old_topk_logprobs, loss, stats, dloss_ds, dloss_dtopk, flags, advantage,
        int(seed), int(step), float(normaliser), bool(mask_bad_input), scratch, int(stream),
    )  # fmt: skip
    raise_status(st, seq_offsets)
    return _summary(loss, stats) if own else None
