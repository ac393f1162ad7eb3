"""tropd.distributed through the package: two torch.distributed gloo processes shard the rows
over the vocabulary (a tensor group of two) or over the batch (a data group of two) and must
give the single-process tropd.evaluate_rows' loss, gradient columns and decisions, for
several presets, and a differentiable loss whose .grad is the shard's gradient
(docs/distributed.md)."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tropd

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")

V = 1003  # not divisible by two: uneven shards
SEQ_LEN = [5, 3, 6, 4, 2, 4]


def _batch(seed=3):
    g = np.random.default_rng(seed)
    offs = np.concatenate([[0], np.cumsum(SEQ_LEN)]).astype(np.int64)
    n = int(offs[-1])
    origin = np.full(n, tropd.STUDENT, dtype=np.uint8)
    for j, L in enumerate(SEQ_LEN):
        origin[offs[j]] = tropd.PROMPT
        if L >= 4:
            origin[offs[j] + 1] = tropd.TEACHER
    z = (2.0 * g.standard_normal((n, V))).astype(np.float32)
    u = (z + 1.5 * g.standard_normal((n, V))).astype(np.float32)
    ids = g.integers(0, V, n).astype(np.int32)
    ids[::7] = V - 1  # the last shard owns y
    u[1::7, :40] += 14.0  # the teacher's top-k lies in the first shard
    z[2::7, ids[2::7]] += 25.0  # peaked students
    u[3::7, ids[3::7]] -= 12.0  # outliers
    return dict(z=z, u=u, ids=ids, origin=origin, offs=offs, seq_ids=np.arange(len(SEQ_LEN), dtype=np.int64))


def _presets():
    P = tropd.presets
    return {
        "tropd": (P.tropd(), 3),
        "tropd_tail": (P.tropd(k=16, form="p", tail="tail_bucket"), 3),
        "opd": (P.opd(), 3),
        "eopd": (P.eopd(), 3),
        "reopold_phase2": (P.reopold(switch_step=0), 3),
        "entropy_opd": (P.entropy_opd(), 3),
        "gkd": (P.gkd(), 3),
        "vopd": (P.vopd(), 3),
    }


def _close(a, b, rel, abs_tol):
    return bool(np.all(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) <= rel * np.abs(b) + abs_tol))


def _worker(rank, world, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = _batch()
    n = b["z"].shape[0]
    fails = []
    for name, (obj, step) in _presets().items():
        # The single process on the whole batch.
        g_ref = np.zeros((n, V), np.float32)
        f_ref = np.zeros(n, np.uint8)
        loss_ref, diag_ref = tropd.evaluate_rows(
            obj, b["z"], b["ids"], b["origin"], b["offs"], teacher_logits=b["u"], sequence_ids=b["seq_ids"],
            grad=g_ref, flags=f_ref, seed=5, step=step,
        )  # fmt: skip
        for tp, dp in ((2, 1), (1, 2)):
            t, d = rank % tp, rank // tp
            v0, v1 = V * t // tp, V * (t + 1) // tp
            j0, j1 = len(SEQ_LEN) * d // dp, len(SEQ_LEN) * (d + 1) // dp
            r0, r1 = int(b["offs"][j0]), int(b["offs"][j1])
            offs = (b["offs"][j0 : j1 + 1] - r0).astype(np.int64)
            g = np.zeros((r1 - r0, v1 - v0), np.float32)
            f = np.zeros(r1 - r0, np.uint8)
            loss, diag = tropd.distributed.evaluate_rows_sharded(
                obj, b["z"][r0:r1, v0:v1], b["ids"][r0:r1], b["origin"][r0:r1], offs,
                vocab_start=v0, vocab_size=V,
                tensor_group=dist.group.WORLD if tp == 2 else None, data_group=dist.group.WORLD if dp == 2 else None,
                teacher_logits=b["u"][r0:r1, v0:v1], sequence_ids=b["seq_ids"][j0:j1], grad=g, flags=f, seed=5, step=step,
            )  # fmt: skip
            if dp == 2:
                x = torch.tensor([loss], dtype=torch.float64)
                dist.all_reduce(x)
                loss = float(x[0])
            where = f"{name} (tensor {t}/{tp}, data {d}/{dp})"
            wbar = 1.0 / diag_ref["normaliser"]
            if not _close(loss, loss_ref, 1e-6, 1e-5 if name == "vopd" else 1e-7):
                fails.append(f"{where}: loss {loss} vs {loss_ref}")
            if diag["normaliser"] != diag_ref["normaliser"]:
                fails.append(f"{where}: normaliser {diag['normaliser']} vs {diag_ref['normaliser']}")
            if not np.array_equal(f, f_ref[r0:r1]):
                fails.append(f"{where}: flags {f.tolist()} vs {f_ref[r0:r1].tolist()}")
            gr = g_ref[r0:r1, v0:v1]
            # fp32 rounding of the merged sums, scaled by the terms that cancel (docs/distributed.md 3).
            tol = 1e-5 * np.abs(g_ref[r0:r1]).max(axis=1, keepdims=True) + (1e-5 if name == "vopd" else 1e-6) * wbar
            if not np.all(np.abs(g - gr) <= tol):
                fails.append(f"{where}: dL/dz max |diff| {np.abs(g - gr).max()}")
        # The differentiable loss over a vocabulary shard.
        if name == "tropd":
            v0, v1 = V * rank // world, V * (rank + 1) // world
            z = torch.from_numpy(b["z"][:, v0:v1].copy()).requires_grad_()
            loss_t, diag_t = tropd.distributed.distill_loss(
                z, torch.from_numpy(b["ids"]), torch.from_numpy(b["origin"]), torch.from_numpy(b["offs"]),
                vocab_start=v0, vocab_size=V, objective=obj, tensor_group=dist.group.WORLD,
                teacher_logits=torch.from_numpy(b["u"][:, v0:v1].copy()), sequence_ids=b["seq_ids"], seed=5, step=step,
            )  # fmt: skip
            loss_t.backward()
            if not _close(float(loss_t), loss_ref, 1e-6, 1e-7):
                fails.append(f"distill_loss: loss {float(loss_t)} vs {loss_ref}")
            gr = g_ref[:, v0:v1]
            if not np.all(np.abs(z.grad.numpy() - gr) <= 1e-5 * np.abs(g_ref).max(axis=1, keepdims=True) + 1e-6 / diag_ref["normaliser"]):
                fails.append("distill_loss: z.grad differs from the single-process gradient columns")
    with open(f"{out_path}.{rank}", "w") as fh:
        json.dump(fails, fh)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_two_gloo_processes_match_one_process(tmp_path):
    out = os.path.join(tmp_path, "result")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    fails = []
    for r in range(2):
        with open(f"{out}.{r}") as fh:
            fails += [f"rank {r}: {x}" for x in json.load(fh)]
    assert not fails, "\n".join(fails)


def test_single_rank_equals_evaluate_rows():
    # Groups of one: no exchange; the same numbers as tropd.evaluate_rows.
    b = _batch(4)
    n = b["z"].shape[0]
    obj = tropd.presets.tropd()
    g1, g2 = np.zeros((n, V), np.float32), np.zeros((n, V), np.float32)
    l1, d1 = tropd.evaluate_rows(obj, b["z"], b["ids"], b["origin"], b["offs"], teacher_logits=b["u"], grad=g1, seed=1)
    l2, d2 = tropd.distributed.evaluate_rows_sharded(
        obj, b["z"], b["ids"], b["origin"], b["offs"], vocab_start=0, vocab_size=V, teacher_logits=b["u"], grad=g2, seed=1
    )
    assert abs(l1 - l2) <= 1e-6 * abs(l1)
    assert d1["n_trusted"] == d2["n_trusted"]
    assert np.allclose(g1, g2, rtol=0, atol=1e-6 * np.abs(g1).max())


def test_bad_vocabulary_shard_raises():
    b = _batch(4)
    with pytest.raises(tropd.InvalidInputError):
        tropd.distributed.evaluate_rows_sharded(
            tropd.presets.opd(), b["z"][:, :10], b["ids"], b["origin"], b["offs"], vocab_start=0, vocab_size=V, teacher_logits=b["u"][:, :10]
        )
