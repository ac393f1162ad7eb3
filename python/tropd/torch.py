"""tropd for PyTorch: every tropd objective as an autograd op, on CPU tensors (and CUDA tensors
with the extension's CUDA build: tropd::gpu, see docs/python.md "CUDA"), registered with ``torch.library`` so that
``torch.compile(fullgraph=True)`` runs it without a graph break.

Row level (logits in)::

    loss, diag = tropd.torch.distill_loss(student_logits, token_ids, origin,
                                          teacher_logits=teacher_logits,
                                          objective=tropd.presets.tropd(k=64, beta=1e-3),
                                          seed=seed, step=step)
    loss.backward()

Token level (log-probs in, for trainers that compute them, e.g. verl's selective
log-softmax)::

    loss, diag = tropd.torch.distill_loss_from_logprobs(student_logprobs, teacher_logprobs, origin,
                                                        objective=tropd.presets.opd())

Autograd the way fused losses do it: the forward computes the gradient in the same call
(tropd's row passes), saves it, and the backward only multiplies it by ``grad_output`` (or, for
``grad_output`` = 1 on CPU, returns it as is). The gradient is kept in the logits' dtype: the
C++ writes fp32 for fp32 / bf16 / fp16 logits and fp64 for fp64 logits; for 16-bit logits the
fp32 buffer is rounded in place (to nearest even) and returned as a row-strided view, so no
second [n, V] buffer is allocated (docs/python.md).

The two ops (schemas in ``ROWS_SCHEMA`` and ``TOKENS_SCHEMA``) are ``torch.ops.tropd.rows`` and
``torch.ops.tropd.tokens``; the functions below only reshape, cast the small per-token tensors and
call them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

from . import _C, presets as _presets
from ._core import DIAGNOSTIC_NAMES, PROMPT, STUDENT, TEACHER
from ._errors import raise_status

if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 4):
    raise ImportError(f"tropd.torch needs torch >= 2.4 (torch.library.custom ops); found {torch.__version__}")

__all__ = [
    "distill_loss",
    "distill_loss_from_logprobs",
    "fused_linear_distill_loss",
    "drop_sampled_entry",
    "opd_loss",
    "eopd_loss",
    "reopold_loss",
    "entropy_opd_loss",
    "clip_outlier_loss",
    "mask_outlier_loss",
    "fkl_outlier_loss",
    "tropd_loss",
    "gkd_loss",
    "vopd_loss",
    "gopd_loss",
    "DIAGNOSTIC_NAMES",
    "FLAG_BITS",
    "ROWS_SCHEMA",
    "TOKENS_SCHEMA",
    "FUSED_SCHEMA",
    "FUSED_INFO_NAMES",
    "PROMPT",
    "TEACHER",
    "STUDENT",
]

Tensor = torch.Tensor
_NSTATS = len(DIAGNOSTIC_NAMES)

#: The bits of diag["flags"] (tropd::flags).
FLAG_BITS = {
    "trusted": 1 << 0,
    "outlier": 1 << 1,
    "kept": 1 << 2,
    "adv_clipped": 1 << 3,
    "ratio_clipped": 1 << 4,
    "guidance": 1 << 5,
    "counted": 1 << 6,
}

# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

ROWS_SCHEMA = (
    "(Tensor student_logits, Tensor? teacher_logits, Tensor? teacher_token_logprobs, Tensor token_ids, "
    "Tensor origin, Tensor seq_offsets, Tensor? sequence_ids, Tensor? old_logprobs, Tensor? ref_logprobs, "
    "Tensor? teacher_topk_ids, Tensor? teacher_topk_logprobs, Tensor? old_topk_logprobs, Tensor? normaliser, "
    "str objective, int seed, int step, float student_temperature, float teacher_temperature, "
    "bool mask_bad_input, bool compute_grad) "
    "-> (Tensor loss, Tensor grad, Tensor stats, Tensor flags, Tensor advantage)"
)
TOKENS_SCHEMA = (
    "(Tensor student_logprobs, Tensor teacher_logprobs, Tensor origin, Tensor seq_offsets, Tensor? sequence_ids, "
    "Tensor? old_logprobs, Tensor? student_topk_logprobs, Tensor? teacher_topk_ids, Tensor? teacher_topk_logprobs, "
    "Tensor? old_topk_logprobs, Tensor? student_entropy, Tensor? teacher_entropy, Tensor? rkl, Tensor? ref_logprobs, "
    "Tensor? normaliser, str objective, int seed, int step, bool mask_bad_input) "
    "-> (Tensor loss, Tensor dloss_ds, Tensor dloss_dtopk, Tensor stats, Tensor flags, Tensor advantage)"
)

torch.library.define("tropd::rows", ROWS_SCHEMA)
torch.library.define("tropd::tokens", TOKENS_SCHEMA)


def _d(t: Optional[Tensor]):
    """A tensor as the extension takes it: a DLPack capsule of the detached tensor.
    (torch.utils.dlpack.to_dlpack, not Tensor.__dlpack__: the latter makes the default CUDA
    stream wait on the current one for every tensor; a capsule carries no stream logic.)"""
    return None if t is None else _to_dlpack(t.detach())


def _normaliser_value(normaliser: Optional[Tensor]) -> float:
    """0: the aggregation's own count. The objective takes its normaliser as a number, so a CUDA
    tensor is read here (one synchronisation; numbers become CPU tensors, read without one)."""
    return 0.0 if normaliser is None else float(normaliser.item())


def _grad_type(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cuda_stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _cuda_scratch(answer, device: torch.device, seq_offsets: Tensor) -> Tensor:
    """The CUDA path's scratch: a uint8 tensor from torch's caching allocator, of the size the
    extension's scratch-size query answered for the same arguments (tropd allocates nothing)."""
    if isinstance(answer, tuple):  # the query found an argument error: the call's exception
        raise_status(answer, seq_offsets)
    return torch.empty(int(answer), dtype=torch.uint8, device=device)


def _rows_impl(student_logits, teacher_logits, teacher_token_logprobs, token_ids, origin, seq_offsets, sequence_ids,
               old_logprobs, ref_logprobs, teacher_topk_ids, teacher_topk_logprobs, old_topk_logprobs, normaliser,
               objective, seed, step, student_temperature, teacher_temperature, mask_bad_input, compute_grad):  # fmt: skip
    n, V = student_logits.shape
    dev = student_logits.device
    gdt = _grad_type(student_logits.dtype)
    loss = torch.empty((), dtype=gdt, device=dev)
    g = torch.empty((n, V), dtype=gdt, device=dev) if compute_grad else None
    stats = torch.empty(_NSTATS, dtype=torch.float64, device=dev)
    flags = torch.empty(n, dtype=torch.uint8, device=dev)
    adv = torch.empty(n, dtype=gdt, device=dev)
    norm = _normaliser_value(normaliser)

    def args():  # fresh DLPack capsules for each call (a capsule is consumed once)
        return (
            objective, _d(student_logits), _d(teacher_logits), _d(teacher_token_logprobs), _d(token_ids), _d(origin),
            _d(seq_offsets), _d(sequence_ids), _d(old_logprobs), _d(ref_logprobs), _d(teacher_topk_ids),
            _d(teacher_topk_logprobs), _d(old_topk_logprobs), _d(g), _d(loss), _d(stats), _d(flags), _d(adv), None,
            int(seed), int(step), float(student_temperature), float(teacher_temperature), norm, torch.get_num_threads(),
            bool(mask_bad_input),
        )  # fmt: skip

    if dev.type == "cuda":
        # tropd::gpu::evaluate_rows on torch's current stream, with scratch from torch's caching
        # allocator; the call reads its status word back (its one synchronisation, docs/python.md).
        with torch.cuda.device(dev):
            scratch = _cuda_scratch(_C.rows_scratch_bytes(*args()), dev, seq_offsets)
            st = _C.evaluate_rows(*args(), _d(scratch), _cuda_stream(student_logits))
    else:
        st = _C.evaluate_rows(*args(), None, 0)
    raise_status(st, seq_offsets)
    if g is None:
        g = student_logits.new_empty((0,))
    elif g.dtype != student_logits.dtype:
        g = _narrow(g, student_logits.dtype)
    return loss, g, stats, flags, adv


def _narrow(g: Tensor, dtype: torch.dtype) -> Tensor:
    """The fp32 gradient of 16-bit logits rounded to their dtype in place: a [n, V] view with row
    stride 2V over the fp32 buffer, so no second [n, V] buffer exists (the peak is the fp32 one).
    Rows are rounded in blocks of about 1M elements through a small temporary (torch's own
    vectorised round-to-nearest-even): a block's 16-bit values overwrite the first half of its
    own rows' bytes, which nothing reads again."""
    n, V = g.shape
    out = g.view(dtype)[:, :V]
    step = max(1, (1 << 20) // max(V, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        out[r0:r1].copy_(g[r0:r1].to(dtype))
    return out


torch.library.impl("tropd::rows", "CPU")(_rows_impl)
torch.library.impl("tropd::rows", "CUDA")(_rows_impl)


@torch.library.register_fake("tropd::rows")
def _rows_fake(student_logits, teacher_logits, teacher_token_logprobs, token_ids, origin, seq_offsets, sequence_ids,
               old_logprobs, ref_logprobs, teacher_topk_ids, teacher_topk_logprobs, old_topk_logprobs, normaliser,
               objective, seed, step, student_temperature, teacher_temperature, mask_bad_input, compute_grad):  # fmt: skip
    n, V = student_logits.shape
    gdt = _grad_type(student_logits.dtype)
    loss = student_logits.new_empty((), dtype=gdt)
    if not compute_grad:
        g = student_logits.new_empty((0,))
    elif gdt != student_logits.dtype:
        g = student_logits.new_empty_strided((n, V), (2 * V, 1))  # see _narrow
    else:
        g = student_logits.new_empty((n, V))
    stats = student_logits.new_empty((_NSTATS,), dtype=torch.float64)
    flags = student_logits.new_empty((n,), dtype=torch.uint8)
    adv = student_logits.new_empty((n,), dtype=gdt)
    return loss, g, stats, flags, adv


def _rows_setup_context(ctx, inputs, output):
    loss, g, stats, flags, adv = output
    ctx.save_for_backward(g)
    ctx.mark_non_differentiable(g, stats, flags, adv)
    # No zero gradients for the other outputs (one would be an [n x V] tensor of zeros).
    ctx.set_materialize_grads(False)
    # Eager only: a second reference to the gradient tensor itself (it has no grad_fn: no cycle),
    # returned by the backward when grad_output is 1; see _rows_backward.
    ctx.grad_ref = g if type(g) is torch.Tensor else None


def _is_eager_one(x: Tensor) -> bool:
    """grad_output is a plain CPU tensor holding 1 (the usual loss.backward()), outside any tracing
    (torch.compile and make_fx see tensor subclasses) and any functorch transform."""
    if type(x) is not torch.Tensor or x.device.type != "cpu" or x.requires_grad or x.numel() != 1:
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and wrapped(x):
        return False
    return x.item() == 1.0


def _rows_backward(ctx, grad_loss, grad_g, grad_stats, grad_flags, grad_adv):
    (g,) = ctx.saved_tensors  # also the version check: the gradient must not have been modified
    if grad_loss is None:
        return (None,) * 20
    if g.dim() != 2:
        raise RuntimeError("tropd: backward through a loss computed without its gradient (compute_grad=False)")
    # grad_output = 1 (eager, CPU): the gradient computed in the forward is the answer. It is
    # returned as the tensor ctx still references, so no consumer may adopt and modify it:
    # AccumulateGrad copies it into a leaf's .grad (as it would the product), and a non-leaf
    # consumer (the lm_head matmul's backward) only reads it, which saves an [n x V] allocation
    # and pass. Otherwise (and on CUDA, where reading grad_output would synchronise, and under
    # tracing) the product is a new tensor.
    if ctx.grad_ref is not None and _is_eager_one(grad_loss):
        return (ctx.grad_ref,) + (None,) * 19
    return (g * grad_loss.to(g.dtype),) + (None,) * 19


torch.library.register_autograd("tropd::rows", _rows_backward, setup_context=_rows_setup_context)


def _tokens_impl(student_logprobs, teacher_logprobs, origin, seq_offsets, sequence_ids, old_logprobs,
                 student_topk_logprobs, teacher_topk_ids, teacher_topk_logprobs, old_topk_logprobs, student_entropy,
                 teacher_entropy, rkl, ref_logprobs, normaliser, objective, seed, step, mask_bad_input):  # fmt: skip
    (n,) = student_logprobs.shape
    dev = student_logprobs.device
    gdt = student_logprobs.dtype
    K = 0 if student_topk_logprobs is None else student_topk_logprobs.shape[1]
    loss = torch.empty((), dtype=gdt, device=dev)
    dlds = torch.empty(n, dtype=gdt, device=dev)
    tdt = gdt if student_topk_logprobs is None else student_topk_logprobs.dtype
    dldk = torch.empty((n, K), dtype=tdt, device=dev)
    stats = torch.empty(_NSTATS, dtype=torch.float64, device=dev)
    flags = torch.empty(n, dtype=torch.uint8, device=dev)
    adv = torch.empty(n, dtype=gdt, device=dev)
    norm = _normaliser_value(normaliser)

    def args():  # fresh DLPack capsules for each call (a capsule is consumed once)
        return (
            objective, _d(student_logprobs), _d(teacher_logprobs), _d(origin), _d(seq_offsets), _d(sequence_ids),
            _d(old_logprobs), _d(student_entropy), _d(teacher_entropy), _d(rkl), _d(ref_logprobs), _d(teacher_topk_ids),
            _d(teacher_topk_logprobs), _d(student_topk_logprobs), _d(old_topk_logprobs), _d(loss), _d(stats), _d(dlds),
            _d(dldk) if K > 0 else None, _d(flags), _d(adv), int(seed), int(step), norm, bool(mask_bad_input),
        )  # fmt: skip

    if dev.type == "cuda":
        # tropd::gpu::evaluate_tokens, as in _rows_impl.
        with torch.cuda.device(dev):
            scratch = _cuda_scratch(_C.tokens_scratch_bytes(*args()), dev, seq_offsets)
            st = _C.evaluate_tokens(*args(), _d(scratch), _cuda_stream(student_logprobs))
    else:
        st = _C.evaluate_tokens(*args(), None, 0)
    raise_status(st, seq_offsets)
    if K == 0:
        dldk.zero_()
    return loss, dlds, dldk, stats, flags, adv


torch.library.impl("tropd::tokens", "CPU")(_tokens_impl)
torch.library.impl("tropd::tokens", "CUDA")(_tokens_impl)


@torch.library.register_fake("tropd::tokens")
def _tokens_fake(student_logprobs, teacher_logprobs, origin, seq_offsets, sequence_ids, old_logprobs,
                 student_topk_logprobs, teacher_topk_ids, teacher_topk_logprobs, old_topk_logprobs, student_entropy,
                 teacher_entropy, rkl, ref_logprobs, normaliser, objective, seed, step, mask_bad_input):  # fmt: skip
    (n,) = student_logprobs.shape
    gdt = student_logprobs.dtype
    K = 0 if student_topk_logprobs is None else student_topk_logprobs.shape[1]
    tdt = gdt if student_topk_logprobs is None else student_topk_logprobs.dtype
    return (
        student_logprobs.new_empty((), dtype=gdt),
        student_logprobs.new_empty((n,), dtype=gdt),
        student_logprobs.new_empty((n, K), dtype=tdt),
        student_logprobs.new_empty((_NSTATS,), dtype=torch.float64),
        student_logprobs.new_empty((n,), dtype=torch.uint8),
        student_logprobs.new_empty((n,), dtype=gdt),
    )


def _tokens_setup_context(ctx, inputs, output):
    loss, dlds, dldk, stats, flags, adv = output
    ctx.has_topk = inputs[6] is not None
    ctx.save_for_backward(dlds, dldk)
    ctx.mark_non_differentiable(dlds, dldk, stats, flags, adv)
    ctx.set_materialize_grads(False)


def _tokens_backward(ctx, grad_loss, grad_dlds, grad_dldk, grad_stats, grad_flags, grad_adv):
    dlds, dldk = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 19
    grad_s = dlds * grad_loss.to(dlds.dtype)
    grad_topk = dldk * grad_loss.to(dldk.dtype) if ctx.has_topk else None
    return (grad_s, None, None, None, None, None, grad_topk) + (None,) * 12


torch.library.register_autograd("tropd::tokens", _tokens_backward, setup_context=_tokens_setup_context)

# ---------------------------------------------------------------------------------------------
# Input preparation (small per-token tensors only; the [.., V] logits are never copied unless
# their strides force it, see distill_loss)
# ---------------------------------------------------------------------------------------------


def _origin_tags(origin: Tensor) -> Tensor:
    """bool (True = a student sample, False = prompt) or integer tags -> uint8 tags."""
    if origin.dtype == torch.bool:
        return origin.to(torch.uint8) * STUDENT
    if origin.is_floating_point():
        raise ValueError("tropd: origin must be a bool mask or integer tags (PROMPT=0, TEACHER=1, STUDENT=2), not floats")
    return origin.to(torch.uint8)


def _values(t: Optional[Tensor], shape, name: str) -> Optional[Tensor]:
    """A per-token value tensor (detached inputs only) reshaped to `shape`, fp32 unless it is fp64."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"tropd: {name} must be a tensor")
    if t.numel() != math.prod(shape):
        _shape_error(name, t, shape)
    t = t.reshape(shape)
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _shape_error(name, t, shape):
    raise ValueError(f"tropd: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} (or the same number of elements)")


def _check_shape(name: str, t: Optional[Tensor], shape) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"tropd: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(
                f"tropd: {name} is on {t.device} but the student tensor is on {device} (every tensor of a call must be on the same device)"
            )


def _normaliser_tensor(normaliser, device) -> Optional[Tensor]:
    if normaliser is None:
        return None
    if isinstance(normaliser, Tensor):
        if normaliser.numel() != 1:
            raise ValueError("tropd: normaliser must be a number or a one-element tensor")
        return normaliser.detach().reshape(()).to(torch.float64)
    value = float(normaliser)
    if not value > 0:
        raise ValueError("tropd: normaliser must be > 0 (None: the aggregation's own count)")
    # A CPU tensor on either device: the op reads it as a number without a device round trip.
    return torch.tensor(value, dtype=torch.float64)


def _objective(objective) -> "_presets.Objective":
    if objective is None:
        return _presets.tropd()
    if not isinstance(objective, _presets.Objective):
        raise TypeError("tropd: objective must be a tropd.presets config (e.g. tropd.presets.tropd(k=64))")
    return objective


def drop_sampled_entry(topk_ids: Tensor, topk_logprobs: Tensor, token_ids: Tensor):
    """Serving-engine lists with one extra entry for the sampled token (vLLM's ``logprobs`` /
    ``prompt_logprobs``: the top-k plus the sampled token when it is not among them, K + 1
    entries, -inf padded, any order) -> (top-k ids, top-k log-probs, sampled-token log-prob).

    The top-k are the K largest of the K + 1 entries (the extra entry is the smallest when the
    sampled token is not in the top-k; otherwise the padding entry is); the sampled token's
    log-prob is its entry's (-inf if the list does not hold it). Shapes [..., K + 1] and [...].
    """
    k = topk_ids.shape[-1] - 1
    if k < 1:
        raise ValueError("tropd: a list with a sampled-token entry needs at least 2 entries")
    lp = topk_logprobs if topk_logprobs.dtype in (torch.float32, torch.float64) else topk_logprobs.float()
    vals, idx = torch.topk(lp, k, dim=-1)
    ids = torch.gather(topk_ids, -1, idx)
    match = topk_ids == token_ids.unsqueeze(-1).to(topk_ids.dtype)
    t = torch.where(match, lp, torch.full_like(lp, -math.inf)).amax(dim=-1)
    return ids, vals, t


@dataclasses.dataclass
class _Metadata:
    """The per-row inputs of a row-level call in the op's types (see _row_metadata)."""

    ids: Tensor
    tags: Tensor
    offs: Tensor
    t: Optional[Tensor]
    tk_ids: Optional[Tensor]
    tk_lp: Optional[Tensor]
    old_tk: Optional[Tensor]
    seq_ids: Optional[Tensor]


def _row_metadata(layout, n, dev, token_ids, origin, teacher_token_logprobs, teacher_topk_ids, teacher_topk_logprobs,
                  topk_sampled_entry, has_teacher_logits, seq_offsets, sequence_ids, old_topk_logprobs) -> _Metadata:  # fmt: skip
    """Token ids, origin tags, offsets and the teacher's per-row lists of distill_loss and
    fused_linear_distill_loss, flattened to n rows (shapes checked against `layout`)."""
    tags = _origin_tags(origin.reshape(n))
    ids = torch.where(tags == PROMPT, torch.zeros_like(token_ids.reshape(n)), token_ids.reshape(n)).to(torch.int32)
    if seq_offsets is None:
        step_T = layout[1] if len(layout) == 2 else n
        offs = torch.arange(0, n + 1, max(step_T, 1), dtype=torch.int64, device=dev)
    else:
        offs = seq_offsets.to(torch.int64)
    t = _values(teacher_token_logprobs, (n,), "teacher_token_logprobs")
    tk_ids = tk_lp = None
    if (teacher_topk_ids is None) != (teacher_topk_logprobs is None):
        raise ValueError("tropd: teacher_topk_ids and teacher_topk_logprobs go together")
    if teacher_topk_ids is not None:
        K = teacher_topk_ids.shape[-1]
        _check_shape("teacher_topk_ids", teacher_topk_ids, layout + (K,))
        _check_shape("teacher_topk_logprobs", teacher_topk_logprobs, layout + (K,))
        tk_ids, tk_lp = teacher_topk_ids.reshape(n, K), teacher_topk_logprobs.reshape(n, K)
        if topk_sampled_entry:
            tk_ids, tk_lp, t_lists = drop_sampled_entry(tk_ids, tk_lp, ids)
            if t is None and not has_teacher_logits:
                t = t_lists
            K -= 1
        tk_ids = tk_ids.to(torch.int32)
        tk_lp = tk_lp.detach() if tk_lp.dtype in (torch.float32, torch.float64) else tk_lp.detach().float()
    old_tk = None
    if old_topk_logprobs is not None:
        old_tk = _values(old_topk_logprobs, (n, old_topk_logprobs.shape[-1]), "old_topk_logprobs")
    seq_ids = None if sequence_ids is None else sequence_ids.to(torch.int64)
    return _Metadata(ids, tags, offs, t, tk_ids, tk_lp, old_tk, seq_ids)


def _diagnostics(stats: Tensor, flags: Tensor, adv: Tensor, shape) -> dict:
    d = dict(zip(DIAGNOSTIC_NAMES, stats.unbind(0)))
    d["flags"] = flags.view(shape)
    d["advantage"] = adv.view(shape)
    return d


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def distill_loss(
    student_logits: Tensor,
    token_ids: Tensor,
    origin: Tensor,
    *,
    objective: Optional[_presets.Objective] = None,
    teacher_logits: Optional[Tensor] = None,
    teacher_token_logprobs: Optional[Tensor] = None,
    teacher_topk_ids: Optional[Tensor] = None,
    teacher_topk_logprobs: Optional[Tensor] = None,
    topk_sampled_entry: bool = False,
    seq_offsets: Optional[Tensor] = None,
    sequence_ids: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    old_topk_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    seed: int = 0,
    step: int = 0,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    normaliser: Union[None, float, Tensor] = None,
    mask_bad_input: bool = False,
) -> tuple[Tensor, dict]:
    """A distillation loss from the student's logits, with its gradient (row level).

    Layouts:
      - padded: ``student_logits`` [B, T, V] with ``token_ids`` and ``origin`` [B, T] (each batch
        row is one sequence; the layout TRL and verl use);
      - packed: ``student_logits`` [N, V] with ``token_ids`` and ``origin`` [N] and
        ``seq_offsets`` [n_seq + 1] (CSR offsets / cu_seqlens; default: one sequence).
    Row i of the logits is the distribution of ``token_ids[i]`` (shift as for cross-entropy).

    ``origin``: a bool mask (True = a student sample, TRL's completion mask / verl's response
    mask; False = no loss) or integer tags ``tropd.PROMPT`` (0), ``tropd.TEACHER`` (1, a
    teacher-prefix token: off-policy guidance), ``tropd.STUDENT`` (2). Token ids of prompt
    positions are not read (-100 is fine there).

    The teacher, one of:
      - ``teacher_logits`` like the student's (same dtype; the teacher's top-k are selected from
        them where the objective needs them, unless lists are given);
      - ``teacher_token_logprobs`` [B, T] / [N] (a served teacher: log p_T of each token), plus,
        for objectives with a top-k term (TrOPD, FKL outlier, EOPD), ``teacher_topk_ids`` and
        ``teacher_topk_logprobs`` [B, T, K] / [N, K] with K = the objective's k (ids of any
        integer dtype, log-probs possibly unnormalised, -inf padding allowed). With
        ``topk_sampled_entry=True`` the lists carry K + 1 entries, vLLM-style (the sampled
        token's entry added): see drop_sampled_entry; the sampled token's log-prob is then
        taken from the lists when ``teacher_token_logprobs`` is not given.

    ``old_logprobs``: rollout-time log p_S of each token (default: the current value, detached,
    i.e. rho = 1 on the first update of a step); ``old_topk_logprobs`` the same at the teacher's
    top-k ids (form C on later updates). ``ref_logprobs``: G-OPD's reference model.
    ``sequence_ids`` [n_seq] int64: global sequence ids keying the trust-region draws with
    ``seed`` and ``step`` (default: the index in this batch; give global ids when a step is split
    into micro-batches). ``student_temperature`` / ``teacher_temperature`` divide the logits
    (not given lists or log-probs). ``normaliser``: the aggregation's external denominator
    (a global token count, a number or a one-element tensor; default: this batch's count).
    ``mask_bad_input``: treat tokens with NaN / inf inputs as prompt tokens instead of raising.

    Returns ``(loss, diagnostics)``: the loss is a 0-d tensor (float32; float64 for float64
    logits) whose ``backward()`` yields dL/dz in the logits' dtype; ``diagnostics`` maps
    ``DIAGNOSTIC_NAMES`` to 0-d float64 tensors (loss parts, trust / outlier / clip fractions, TV
    estimate, top-k masses, mean entropies, counts, ...) plus ``"flags"`` (uint8, FLAG_BITS) and
    ``"advantage"`` per token in the input layout. Everything comes from the same call.

    Raises ``tropd.InvalidInputError`` (a ValueError: shapes, ids, dtypes, devices, strides, top-k
    lists, parameters) or ``tropd.EvaluationError`` (a RuntimeError: NaN / inf values, infinite
    divergences), with the row, column, sequence and position.
    """
    obj = _objective(objective)
    if not isinstance(student_logits, Tensor):
        raise TypeError("tropd: student_logits must be a torch.Tensor")
    dev = student_logits.device
    if student_logits.dim() == 3:
        B, T, V = student_logits.shape
        n = B * T
        layout = (B, T)
        if seq_offsets is not None:
            raise ValueError("tropd: seq_offsets is for the packed layout [N, V]; padded [B, T, V] batches have one sequence per row")
    elif student_logits.dim() == 2:
        n, V = student_logits.shape
        layout = (n,)
    else:
        raise ValueError(f"tropd: student_logits must be [B, T, V] or [N, V], got shape {tuple(student_logits.shape)}")
    _check_shape("token_ids", token_ids, layout)
    _check_shape("origin", origin, layout)
    _check_device(dev, token_ids=token_ids, origin=origin, teacher_logits=teacher_logits,
                  teacher_token_logprobs=teacher_token_logprobs, teacher_topk_ids=teacher_topk_ids,
                  teacher_topk_logprobs=teacher_topk_logprobs, seq_offsets=seq_offsets, sequence_ids=sequence_ids,
                  old_logprobs=old_logprobs, old_topk_logprobs=old_topk_logprobs, ref_logprobs=ref_logprobs)  # fmt: skip
    # [B, T, V] -> [B*T, V]: a view whenever the batch rows are evenly spaced (any row padding);
    # a sliced batch (logits[:, :-1]) is copied here: pass the whole logits with the unwanted
    # positions marked as prompt instead.
    z = student_logits.reshape(n, V)
    tz = None
    if teacher_logits is not None:
        if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
            _shape_error("teacher_logits", teacher_logits, student_logits.shape)
        tz = teacher_logits.reshape(n, teacher_logits.shape[-1])  # a vocabulary mismatch is reported by the op
    m = _row_metadata(layout, n, dev, token_ids, origin, teacher_token_logprobs, teacher_topk_ids, teacher_topk_logprobs,
                      topk_sampled_entry, tz is not None, seq_offsets, sequence_ids, old_topk_logprobs)  # fmt: skip
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _g, stats, flags, adv = torch.ops.tropd.rows(
        z, tz, m.t, m.ids, m.tags, m.offs, m.seq_ids, _values(old_logprobs, (n,), "old_logprobs"),
        _values(ref_logprobs, (n,), "ref_logprobs"), m.tk_ids, m.tk_lp, m.old_tk, _normaliser_tensor(normaliser, dev),
        obj.spec(), int(seed), int(step), float(student_temperature), float(teacher_temperature),
        bool(mask_bad_input), compute_grad,
    )  # fmt: skip
    return loss, _diagnostics(stats, flags, adv, layout)


def distill_loss_from_logprobs(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    origin: Tensor,
    *,
    objective: Optional[_presets.Objective] = None,
    seq_offsets: Optional[Tensor] = None,
    sequence_ids: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    student_topk_logprobs: Optional[Tensor] = None,
    teacher_topk_ids: Optional[Tensor] = None,
    teacher_topk_logprobs: Optional[Tensor] = None,
    old_topk_logprobs: Optional[Tensor] = None,
    student_entropy: Optional[Tensor] = None,
    teacher_entropy: Optional[Tensor] = None,
    rkl: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    seed: int = 0,
    step: int = 0,
    normaliser: Union[None, float, Tensor] = None,
    mask_bad_input: bool = False,
) -> tuple[Tensor, dict]:
    """A distillation loss from per-token log-probs (token level), for trainers that compute
    log-probs themselves (verl's selective log-softmax): the gradient flows to
    ``student_logprobs`` (and ``student_topk_logprobs``) through your own autograd graph.

    ``student_logprobs`` [B, T] / [N] (log p_S of each token, with autograd), ``teacher_logprobs``
    likewise (log p_T, -inf allowed), ``origin`` as in distill_loss. Objectives with a top-k term
    need ``student_topk_logprobs`` (log p_S at the teacher's ids, with autograd),
    ``teacher_topk_ids`` and ``teacher_topk_logprobs`` [B, T, K] / [N, K]; EOPD needs
    ``teacher_entropy``, REOPOLD and Entropy OPD ``student_entropy``, vOPD ``rkl`` (the detached
    per-position KL(p_S || p_T)), G-OPD ``ref_logprobs``. GKD (a full-vocabulary term) needs
    logits: use distill_loss. Other arguments and the result as in distill_loss (without
    temperatures: the log-probs are taken as given).
    """
    obj = _objective(objective)
    if not isinstance(student_logprobs, Tensor):
        raise TypeError("tropd: student_logprobs must be a torch.Tensor")
    dev = student_logprobs.device
    if student_logprobs.dim() == 2:
        B, T = student_logprobs.shape
        n, layout = B * T, (B, T)
        if seq_offsets is not None:
            raise ValueError("tropd: seq_offsets is for the packed layout [N]; padded [B, T] batches have one sequence per row")
    elif student_logprobs.dim() == 1:
        (n,) = student_logprobs.shape
        layout = (n,)
    else:
        raise ValueError(f"tropd: student_logprobs must be [B, T] or [N], got shape {tuple(student_logprobs.shape)}")
    _check_shape("teacher_logprobs", teacher_logprobs, layout)
    _check_shape("origin", origin, layout)
    _check_device(dev, teacher_logprobs=teacher_logprobs, origin=origin, seq_offsets=seq_offsets, sequence_ids=sequence_ids,
                  old_logprobs=old_logprobs, student_topk_logprobs=student_topk_logprobs, teacher_topk_ids=teacher_topk_ids,
                  teacher_topk_logprobs=teacher_topk_logprobs, old_topk_logprobs=old_topk_logprobs,
                  student_entropy=student_entropy, teacher_entropy=teacher_entropy, rkl=rkl, ref_logprobs=ref_logprobs)  # fmt: skip
    s = student_logprobs.reshape(n)
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()
    tags = _origin_tags(origin.reshape(n))
    if seq_offsets is None:
        step_T = layout[1] if len(layout) == 2 else n
        offs = torch.arange(0, n + 1, max(step_T, 1), dtype=torch.int64, device=dev)
    else:
        offs = seq_offsets.to(torch.int64)
    s_k = tk_ids = tk_lp = old_tk = None
    given = [x is not None for x in (student_topk_logprobs, teacher_topk_ids, teacher_topk_logprobs)]
    if any(given) and not all(given):
        raise ValueError("tropd: student_topk_logprobs, teacher_topk_ids and teacher_topk_logprobs go together")
    if all(given):
        K = teacher_topk_ids.shape[-1]
        for name, x in (("student_topk_logprobs", student_topk_logprobs), ("teacher_topk_ids", teacher_topk_ids),
                        ("teacher_topk_logprobs", teacher_topk_logprobs)):  # fmt: skip
            _check_shape(name, x, layout + (K,))
        s_k = student_topk_logprobs.reshape(n, K)
        if s_k.dtype not in (torch.float32, torch.float64):
            s_k = s_k.float()
        tk_ids = teacher_topk_ids.reshape(n, K).to(torch.int32)
        tk_lp = _values(teacher_topk_logprobs, (n, K), "teacher_topk_logprobs")
        old_tk = _values(old_topk_logprobs, (n, K), "old_topk_logprobs")
    seq_ids = None if sequence_ids is None else sequence_ids.to(torch.int64)
    loss, _dlds, _dldk, stats, flags, adv = torch.ops.tropd.tokens(
        s, _values(teacher_logprobs, (n,), "teacher_logprobs"), tags, offs, seq_ids,
        _values(old_logprobs, (n,), "old_logprobs"), s_k, tk_ids, tk_lp, old_tk,
        _values(student_entropy, (n,), "student_entropy"), _values(teacher_entropy, (n,), "teacher_entropy"),
        _values(rkl, (n,), "rkl"), _values(ref_logprobs, (n,), "ref_logprobs"), _normaliser_tensor(normaliser, dev),
        obj.spec(), int(seed), int(step), bool(mask_bad_input),
    )  # fmt: skip
    return loss, _diagnostics(stats, flags, adv, layout)


# ---------------------------------------------------------------------------------------------
# The fused LM head: tropd::fused_lm_head (host::fused_lm_head, docs/fused_lm_head.md)
# ---------------------------------------------------------------------------------------------

FUSED_SCHEMA = (
    "(Tensor student_hidden, Tensor student_weight, Tensor? bias, Tensor? teacher_hidden, Tensor? teacher_weight, "
    "Tensor? teacher_bias, Tensor? teacher_logits, Tensor? teacher_token_logprobs, Tensor token_ids, Tensor origin, "
    "Tensor seq_offsets, Tensor? sequence_ids, Tensor? old_logprobs, Tensor? ref_logprobs, Tensor? teacher_topk_ids, "
    "Tensor? teacher_topk_logprobs, Tensor? old_topk_logprobs, Tensor? normaliser, str objective, int seed, int step, "
    "float logit_scale, float softcap, float teacher_logit_scale, float teacher_softcap, float student_temperature, "
    "float teacher_temperature, int chunk, int scratch_budget, bool mask_bad_input, bool grad_hidden, bool grad_weight, "
    "bool grad_bias) "
    "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias, Tensor stats, Tensor flags, "
    "Tensor advantage, Tensor info)"
)
_FUSED_NARGS = 33
#: The entries of the fused op's `info` output (diagnostics "fused_chunk", ...).
FUSED_INFO_NAMES = ("fused_chunk", "fused_scratch_bytes", "fused_sweeps")

torch.library.define("tropd::fused_lm_head", FUSED_SCHEMA)


def _fused_impl(student_hidden, student_weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                teacher_token_logprobs, token_ids, origin, seq_offsets, sequence_ids, old_logprobs, ref_logprobs,
                teacher_topk_ids, teacher_topk_logprobs, old_topk_logprobs, normaliser, objective, seed, step,
                logit_scale, softcap, teacher_logit_scale, teacher_softcap, student_temperature, teacher_temperature,
                chunk, scratch_budget, mask_bad_input, grad_hidden, grad_weight, grad_bias):  # fmt: skip
    n = student_hidden.shape[0]
    dev, dt = student_hidden.device, student_hidden.dtype
    loss = torch.empty((), dtype=dt, device=dev)
    gh = torch.empty(student_hidden.shape, dtype=dt, device=dev) if grad_hidden else None
    # dL/dW and dL/db are added to by the C++ (one GEMM per chunk accumulates): zeroed here.
    gw = torch.zeros(student_weight.shape, dtype=dt, device=dev) if grad_weight else None
    gb = torch.zeros(student_weight.shape[0], dtype=dt, device=dev) if grad_bias else None
    stats = torch.empty(_NSTATS, dtype=torch.float64, device=dev)
    flags = torch.empty(n, dtype=torch.uint8, device=dev)
    adv = torch.empty(n, dtype=dt, device=dev)
    norm = 0.0 if dev.type != "cpu" else _normaliser_value(normaliser)
    st, used_chunk, scratch_bytes, sweeps = _C.evaluate_fused(
        objective, _d(student_hidden), _d(student_weight), _d(bias), _d(teacher_hidden), _d(teacher_weight),
        _d(teacher_bias), _d(teacher_logits), _d(teacher_token_logprobs), _d(token_ids), _d(origin), _d(seq_offsets),
        _d(sequence_ids), _d(old_logprobs), _d(ref_logprobs), _d(teacher_topk_ids), _d(teacher_topk_logprobs),
        _d(old_topk_logprobs), _d(gh), _d(gw), _d(gb), _d(loss), _d(stats), _d(flags), _d(adv), int(seed), int(step),
        float(logit_scale), float(softcap), float(teacher_logit_scale), float(teacher_softcap),
        float(student_temperature), float(teacher_temperature), norm, int(chunk), int(scratch_budget),
        torch.get_num_threads(), bool(mask_bad_input),
    )  # fmt: skip
    raise_status(st, seq_offsets if seq_offsets.device.type == "cpu" else None)
    empty = student_hidden.new_empty((0,))
    info = torch.tensor([used_chunk, scratch_bytes, sweeps], dtype=torch.int64, device=dev)
    return (loss, empty if gh is None else gh, empty.clone() if gw is None else gw, empty.clone() if gb is None else gb,
            stats, flags, adv, info)  # fmt: skip


torch.library.impl("tropd::fused_lm_head", "CPU")(_fused_impl)
# CUDA tensors reach the extension, which answers NotImplementedError (no device binding).
torch.library.impl("tropd::fused_lm_head", "CUDA")(_fused_impl)


@torch.library.register_fake("tropd::fused_lm_head")
def _fused_fake(student_hidden, student_weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                teacher_token_logprobs, token_ids, origin, seq_offsets, sequence_ids, old_logprobs, ref_logprobs,
                teacher_topk_ids, teacher_topk_logprobs, old_topk_logprobs, normaliser, objective, seed, step,
                logit_scale, softcap, teacher_logit_scale, teacher_softcap, student_temperature, teacher_temperature,
                chunk, scratch_budget, mask_bad_input, grad_hidden, grad_weight, grad_bias):  # fmt: skip
    h = student_hidden
    n = h.shape[0]
    return (
        h.new_empty(()),
        h.new_empty(h.shape) if grad_hidden else h.new_empty((0,)),
        h.new_empty(student_weight.shape) if grad_weight else h.new_empty((0,)),
        h.new_empty((student_weight.shape[0],)) if grad_bias else h.new_empty((0,)),
        h.new_empty((_NSTATS,), dtype=torch.float64),
        h.new_empty((n,), dtype=torch.uint8),
        h.new_empty((n,)),
        h.new_empty((len(FUSED_INFO_NAMES),), dtype=torch.int64),
    )


def _fused_setup_context(ctx, inputs, output):
    loss, gh, gw, gb, stats, flags, adv, info = output
    ctx.computed = (bool(inputs[30]), bool(inputs[31]), bool(inputs[32]))
    ctx.save_for_backward(gh, gw, gb)
    ctx.mark_non_differentiable(gh, gw, gb, stats, flags, adv, info)
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_loss, *_unused):
    gh, gw, gb = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * _FUSED_NARGS
    want_h, want_w, want_b = ctx.computed
    if (ctx.needs_input_grad[0] and not want_h) or (ctx.needs_input_grad[1] and not want_w) or (
        ctx.needs_input_grad[2] and not want_b
    ):
        raise RuntimeError(
            "tropd: backward through a fused loss computed without that gradient (the forward ran without grad "
            "mode or before requires_grad was set)"
        )
    # grad_output = 1 (eager, CPU; see _is_eager_one): the saved gradients are the answer. They
    # are returned as unpacked from the saved tensors (no other reference: the op's outputs are
    # dropped by fused_linear_distill_loss), so a leaf weight's AccumulateGrad adopts dL/dW
    # without a copy and the hidden states' consumer only reads dL/dh: no second [V, H] buffer.
    # An adopted .grad shares the saved tensor's version counter: modified in place, a second
    # backward through a retained graph is refused. Otherwise the product is a new tensor.
    if _is_eager_one(grad_loss):
        return (gh if want_h else None, gw if want_w else None, gb if want_b else None) + (None,) * (_FUSED_NARGS - 3)
    scale = grad_loss.to(gh.dtype)
    return (
        gh * scale if want_h else None,
        gw * scale if want_w else None,  # a frozen weight: no dL/dW was computed, none is returned
        gb * scale if want_b else None,
    ) + (None,) * (_FUSED_NARGS - 3)


torch.library.register_autograd("tropd::fused_lm_head", _fused_backward, setup_context=_fused_setup_context)


def _head_dtype(name: str, t: Tensor) -> torch.dtype:
    """The dtype the host fused call computes in for a head of dtype t.dtype: fp32 / fp64 as
    they are; bf16 / fp16 widened to fp32 (the host GEMMs are fp32 / fp64)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"tropd: {name} must be a torch.Tensor")
    if t.dtype in (torch.float32, torch.float64):
        return t.dtype
    if t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    raise ValueError(f"tropd: {name} must be float32, float64, bfloat16 or float16, is {t.dtype}")


def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    token_ids: Tensor,
    origin: Tensor,
    *,
    objective: Optional[_presets.Objective] = None,
    bias: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    teacher_logits: Optional[Tensor] = None,
    teacher_token_logprobs: Optional[Tensor] = None,
    teacher_topk_ids: Optional[Tensor] = None,
    teacher_topk_logprobs: Optional[Tensor] = None,
    topk_sampled_entry: bool = False,
    seq_offsets: Optional[Tensor] = None,
    sequence_ids: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    old_topk_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    seed: int = 0,
    step: int = 0,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float = 0.0,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    chunk: int = 0,
    scratch_budget: int = 256 << 20,
    normaliser: Union[None, float, Tensor] = None,
    mask_bad_input: bool = False,
) -> tuple[Tensor, dict]:
    """distill_loss from the student's hidden states and output weight, never holding [n, V]
    logits (Liger's ``fused_linear_*`` pattern; C++ ``host::fused_lm_head``, CPU tensors).

    The student's logits are ``z = softcap * tanh(logit_scale * (h @ W.T + bias) / softcap)``
    (no tanh when ``softcap`` is 0), then divided by ``student_temperature`` as in distill_loss.
    ``student_hidden`` [B, T, H] (padded) or [N, H] (packed), ``student_weight`` [V, H] (the
    layout of ``nn.Linear(H, V).weight``), ``bias`` [V] optional. Hidden, weight and bias share
    one dtype: fp32 or fp64 are used as they are; bf16 / fp16 are widened to fp32 (a copy of
    the weight) and their gradients rounded back by autograd.

    The teacher, one of: its head (``teacher_hidden`` [B, T, H_T] / [N, H_T] and
    ``teacher_weight`` [V, H_T], ``teacher_bias``, ``teacher_logit_scale``, ``teacher_softcap``;
    fused too, detached); its logits ``teacher_logits`` [B, T, V] / [N, V]; or, for objectives
    that do not read its full distribution, its token log-probs ``teacher_token_logprobs`` with
    top-k lists where the objective has a top-k term (as in distill_loss). The other arguments
    are distill_loss's.

    Memory: per chunk of ``chunk`` rows (0: the largest whose chunk buffers fit
    ``scratch_budget`` bytes, default 256 MiB) the call holds the chunk's logits, a teacher
    head's logits and one gradient row per thread; never [n, V]. The gradients are computed
    in the forward: dL/dh [n, H], dL/dW [V, H] (only when ``student_weight.requires_grad``: a
    frozen weight skips its GEMM and gets no gradient), dL/db [V].

    Returns ``(loss, diagnostics)`` as distill_loss, plus ``"fused_chunk"``,
    ``"fused_scratch_bytes"`` (the bytes of chunk buffers the call allocated) and
    ``"fused_sweeps"`` (1 or 2: docs/fused_lm_head.md) as 0-d int64 tensors. CUDA tensors raise
    NotImplementedError (no device binding of the fused head yet).
    """
    obj = _objective(objective)
    h_dt = _head_dtype("student_hidden", student_hidden)
    w_dt = _head_dtype("student_weight", student_weight)
    if student_weight.dtype != student_hidden.dtype:
        raise ValueError(
            f"tropd: student_weight is {student_weight.dtype} but student_hidden is {student_hidden.dtype} (one dtype for the head)"
        )
    if bias is not None and (not isinstance(bias, Tensor) or bias.dtype != student_hidden.dtype):
        raise ValueError(f"tropd: bias must be a tensor of the hidden states' dtype {student_hidden.dtype}")
    dev = student_hidden.device
    if dev.type != "cpu" or student_weight.device.type != "cpu":
        raise NotImplementedError(
            "tropd: fused_linear_distill_loss runs on CPU tensors only: the fused LM head has no CUDA binding in this "
            "extension yet (materialise the logits and use tropd.torch.distill_loss on the GPU)"
        )
    if student_hidden.dim() == 3:
        B, T, H = student_hidden.shape
        n, layout = B * T, (B, T)
        if seq_offsets is not None:
            raise ValueError("tropd: seq_offsets is for the packed layout [N, H]; padded [B, T, H] batches have one sequence per row")
    elif student_hidden.dim() == 2:
        n, H = student_hidden.shape
        layout = (n,)
    else:
        raise ValueError(f"tropd: student_hidden must be [B, T, H] or [N, H], got shape {tuple(student_hidden.shape)}")
    if student_weight.dim() != 2 or student_weight.shape[1] != H:
        raise ValueError(
            f"tropd: student_weight must be [V, H] with H = {H} (the hidden states' last dimension), got shape "
            f"{tuple(student_weight.shape)}"
        )
    V = student_weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"tropd: bias has shape {tuple(bias.shape)}, expected ({V},) (one entry per weight row)")
    for name, x in (("token_ids", token_ids), ("origin", origin)):
        if not isinstance(x, Tensor):
            raise TypeError(f"tropd: {name} must be a torch.Tensor")
    if token_ids.is_floating_point() or token_ids.is_complex():
        raise ValueError(f"tropd: token_ids must be an integer tensor, is {token_ids.dtype}")
    _check_shape("token_ids", token_ids, layout)
    _check_shape("origin", origin, layout)
    _check_device(dev, student_weight=student_weight, bias=bias, token_ids=token_ids, origin=origin,
                  teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                  teacher_logits=teacher_logits, teacher_token_logprobs=teacher_token_logprobs,
                  teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs, seq_offsets=seq_offsets,
                  sequence_ids=sequence_ids, old_logprobs=old_logprobs, old_topk_logprobs=old_topk_logprobs,
                  ref_logprobs=ref_logprobs)  # fmt: skip
    h = student_hidden.reshape(n, H).to(h_dt)
    w = student_weight.to(w_dt)
    b = None if bias is None else bias.to(h_dt)
    th = tw = tb = tz = None
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("tropd: teacher_hidden and teacher_weight go together (the teacher's head)")
    if teacher_hidden is not None:
        _head_dtype("teacher_hidden", teacher_hidden)
        _head_dtype("teacher_weight", teacher_weight)
        if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
            _shape_error("teacher_hidden", teacher_hidden, tuple(student_hidden.shape[:-1]) + (teacher_weight.shape[-1],))
        th = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1]).to(h_dt)
        tw = teacher_weight.detach().to(h_dt)
        tb = None if teacher_bias is None else teacher_bias.detach().to(h_dt)
    elif teacher_bias is not None:
        raise ValueError("tropd: teacher_bias without the teacher's head (teacher_hidden, teacher_weight)")
    if teacher_logits is not None:
        _head_dtype("teacher_logits", teacher_logits)
        if teacher_logits.shape[:-1] != student_hidden.shape[:-1]:
            _shape_error("teacher_logits", teacher_logits, tuple(student_hidden.shape[:-1]) + (V,))
        tz = teacher_logits.detach().reshape(n, teacher_logits.shape[-1]).to(h_dt)
    m = _row_metadata(layout, n, dev, token_ids, origin, teacher_token_logprobs, teacher_topk_ids, teacher_topk_logprobs,
                      topk_sampled_entry, tz is not None or th is not None, seq_offsets, sequence_ids, old_topk_logprobs)  # fmt: skip
    if int(chunk) < 0:
        raise ValueError("tropd: chunk must be >= 0 (0: the largest that fits scratch_budget)")
    if int(scratch_budget) < 1:
        raise ValueError("tropd: scratch_budget must be >= 1 byte")
    grad_on = torch.is_grad_enabled()
    want_h = grad_on and student_hidden.requires_grad
    want_w = grad_on and student_weight.requires_grad
    want_b = grad_on and bias is not None and bias.requires_grad
    loss, _gh, _gw, _gb, stats, flags, adv, info = torch.ops.tropd.fused_lm_head(
        h, w, b, th, tw, tb, tz, m.t, m.ids, m.tags, m.offs, m.seq_ids, _values(old_logprobs, (n,), "old_logprobs"),
        _values(ref_logprobs, (n,), "ref_logprobs"), m.tk_ids, m.tk_lp, m.old_tk, _normaliser_tensor(normaliser, dev),
        obj.spec(), int(seed), int(step), float(logit_scale), float(softcap), float(teacher_logit_scale),
        float(teacher_softcap), float(student_temperature), float(teacher_temperature), int(chunk), int(scratch_budget),
        bool(mask_bad_input), want_h, want_w, want_b,
    )  # fmt: skip
    d = _diagnostics(stats, flags, adv, layout)
    d.update(zip(FUSED_INFO_NAMES, info.unbind(0)))
    return loss, d


# One function per preset: distill_loss with that preset's config built from keyword fields.


def _preset_loss(name: str, cls):
    import inspect

    common = ("aggregation", "aggregation_constant", "eps_low", "eps_high", "dual_clip")
    fields = [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    fields = [f for f in fields if f.name not in common] + [f for f in fields if f.name in common]  # the preset's own first
    cfg_params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in fields]
    cfg_names = {p.name for p in cfg_params}
    base = inspect.signature(distill_loss)
    params = [p for p in base.parameters.values() if p.name != "objective" and p.name not in cfg_names]
    positional = [p for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]

    def loss_fn(student_logits, token_ids, origin, **kwargs):
        cfg = {k: kwargs.pop(k) for k in list(kwargs) if k in cfg_names}
        return distill_loss(student_logits, token_ids, origin, objective=cls(**cfg), **kwargs)

    loss_fn.__name__ = loss_fn.__qualname__ = f"{name}_loss"
    loss_fn.__signature__ = base.replace(parameters=positional + cfg_params + keyword)
    loss_fn.__doc__ = (
        f"distill_loss with objective=tropd.presets.{name}(...): the keyword fields of {cls.__name__} "
        f"(see its docstring) and every other argument of distill_loss.\n\n{cls.__doc__ or ''}"
    )
    return loss_fn


opd_loss = _preset_loss("opd", _presets.OpdConfig)
eopd_loss = _preset_loss("eopd", _presets.EopdConfig)
reopold_loss = _preset_loss("reopold", _presets.ReopoldConfig)
entropy_opd_loss = _preset_loss("entropy_opd", _presets.EntropyOpdConfig)
clip_outlier_loss = _preset_loss("clip_outlier", _presets.ClipOutlierConfig)
mask_outlier_loss = _preset_loss("mask_outlier", _presets.MaskOutlierConfig)
fkl_outlier_loss = _preset_loss("fkl_outlier", _presets.FklOutlierConfig)
tropd_loss = _preset_loss("tropd", _presets.TropdConfig)
gkd_loss = _preset_loss("gkd", _presets.GkdConfig)
vopd_loss = _preset_loss("vopd", _presets.VopdConfig)
gopd_loss = _preset_loss("gopd", _presets.GopdConfig)
