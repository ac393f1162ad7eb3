"""tropd over ``torch.distributed``: the row level on vocabulary-sharded logits and data-parallel
batches, with one all-gather of fixed-size row records per call (two for GKD) among the
tensor-parallel group, and the data-parallel normaliser and batch decisions
(docs/distributed.md).

Each rank of ``tensor_group`` holds the same rows and the columns
``[vocab_start, vocab_start + cols)`` of the student's (and teacher's) logits — Megatron's
vocab-parallel layout; each rank of ``data_group`` holds other rows. Loss, diagnostics,
per-token outputs and trust-region decisions equal the single-process call on the whole batch;
each rank receives dL/dz of its own columns. ``None`` for a group means a group of one (no
exchange). The library never creates a process group: pass the trainer's.

The compiled call (``tropd._C.sharded_rows``) runs tropd's row passes and hands each collective
to this module (``ShardedRowsCall.next()``), which runs it with
``torch.distributed.all_gather_into_tensor`` on host tensors (gloo) or through device copies
(NCCL groups); any other transport can be passed as ``all_gather``.

    loss, diag = tropd.distributed.distill_loss(student_shard, token_ids, origin,
                                                vocab_start=v0, vocab_size=V,
                                                tensor_group=tp_group, data_group=dp_group,
                                                teacher_logits=teacher_shard,
                                                objective=tropd.presets.tropd())
    loss.backward()      # student_shard.grad: dL/dz of this rank's columns

CPU tensors (the host backend); float32 or bfloat16 logits.
"""

from __future__ import annotations

from typing import Callable, Optional

from . import _C
from ._core import _default_outputs, _spec, _summary
from ._errors import raise_status

__all__ = ["evaluate_rows_sharded", "distill_loss", "torch_all_gather"]

_SCOPES = {"global": False, "per_rank": True}


def _group_rank_size(group):
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def torch_all_gather(groups):
    """The default transport: ``torch.distributed.all_gather_into_tensor`` among
    ``groups[g]`` (g = 0: the tensor group, 1: the data group) of the call's uint8 buffers (no
    copy on host; NCCL groups get device copies)."""
    import torch
    import torch.distributed as dist

    def run(g, send, recv):
        group = groups[g]
        s, r = torch.from_numpy(send), torch.from_numpy(recv)
        if dist.get_backend(group) == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
            rd = torch.empty(r.numel(), dtype=torch.uint8, device=dev)
            dist.all_gather_into_tensor(rd, s.to(dev), group=group)
            r.copy_(rd)  # synchronises: the host merges the records next
        else:
            dist.all_gather_into_tensor(r, s, group=group)

    return run


def evaluate_rows_sharded(
    objective,
    student_logits,
    token_ids,
    origin,
    seq_offsets,
    *,
    vocab_start: int,
    vocab_size: int,
    tensor_group=None,
    data_group=None,
    decisions: str = "global",
    data_normaliser: str = "global",
    all_gather: Optional[Callable] = None,
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
):
    """``tropd::dist::evaluate_rows`` on CPU arrays: ``tropd.evaluate_rows``'s arguments and
    outputs with ``student_logits`` (and ``teacher_logits``, ``grad``) of shape
    [n, cols], this rank's columns [vocab_start, vocab_start + cols) of a vocabulary of
    ``vocab_size``. The per-row inputs (token ids, origins, offsets, served-teacher arrays)
    are the same on every rank of ``tensor_group``.

    ``decisions`` / ``data_normaliser``: "global" (the whole data group's entropy quantile,
    sequence masks and token count, one or two all-gathers among ``data_group``) or
    "per_rank". Pass global ``sequence_ids`` when rows are split over ``data_group``.
    ``all_gather(g, send, recv)``: a transport for the exchanges (g = 0 tensor, 1 data; uint8
    numpy arrays, recv = group size x len(send) in rank order); default: torch.distributed.

    Returns ``(loss, {name: value})`` when ``stats`` is not given (this rank's share of the
    loss: the sum over the data group is the batch's), else None.
    """
    if decisions not in _SCOPES or data_normaliser not in _SCOPES:
        raise ValueError("tropd: decisions and data_normaliser are 'global' or 'per_rank'")
    loss, stats, own = _default_outputs(loss, stats, getattr(student_logits, "dtype", None) == "float64")
    tr, ts = _group_rank_size(tensor_group)
    dr, ds = _group_rank_size(data_group)
    call = _C.sharded_rows(
        _spec(objective), student_logits, teacher_logits, teacher_token_logprobs, token_ids, origin, seq_offsets,
        sequence_ids, old_logprobs, ref_logprobs, teacher_topk_ids, teacher_topk_logprobs, old_topk_logprobs,
        grad, loss, stats, flags, advantage, dloss_ds, int(seed), int(step), float(student_temperature),
        float(teacher_temperature), float(normaliser), int(threads), bool(mask_bad_input), int(vocab_start),
        int(vocab_size), tr, ts, dr, ds, _SCOPES[decisions], _SCOPES[data_normaliser],
    )  # fmt: skip
    run = all_gather if all_gather is not None else torch_all_gather((tensor_group, data_group))
    while (ex := call.next()) is not None:
        g, send, recv = ex
        run(g, send, recv)
    raise_status(call.finish(), seq_offsets)
    return _summary(loss, stats) if own else None


def distill_loss(
    student_logits,
    token_ids,
    origin,
    seq_offsets=None,
    *,
    vocab_start: int,
    vocab_size: int,
    objective,
    tensor_group=None,
    data_group=None,
    teacher_logits=None,
    **kw,
):
    """A differentiable loss over this rank's vocabulary shard (torch CPU tensors): the forward
    runs ``evaluate_rows_sharded`` with a gradient buffer, the backward multiplies it by
    ``grad_output`` (as fused losses do). ``student_logits`` [n, cols]; ``seq_offsets``
    defaults to one sequence. Returns ``(loss, diag)`` with diag the diagnostics dictionary;
    other keyword arguments go to ``evaluate_rows_sharded``.
    """
    import torch

    n = student_logits.shape[0]
    if seq_offsets is None:
        seq_offsets = torch.tensor([0, n], dtype=torch.int64)
    gdtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    args = dict(
        vocab_start=vocab_start, vocab_size=vocab_size, tensor_group=tensor_group, data_group=data_group,
        teacher_logits=None if teacher_logits is None else teacher_logits.detach(), **kw,
    )  # fmt: skip

    holder = {}

    class _Sharded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            g = torch.empty(z.shape, dtype=gdtype)
            value, holder["diag"] = evaluate_rows_sharded(
                objective, z.detach(), token_ids.to(torch.int32), origin.to(torch.uint8), seq_offsets.to(torch.int64),
                grad=g, **args,
            )  # fmt: skip
            ctx.save_for_backward(g)
            ctx.zdtype = z.dtype
            return torch.tensor(value, dtype=gdtype)

        @staticmethod
        def backward(ctx, grad_out):
            (g,) = ctx.saved_tensors
            return (g * grad_out).to(ctx.zdtype)

    value = _Sharded.apply(student_logits)
    return value, holder["diag"]
