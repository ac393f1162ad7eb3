"""Bad input: every tropd status becomes a ValueError (InvalidInputError) or a RuntimeError
(EvaluationError) with tropd's message, row and column; nothing is written on failure. And the
NaN class users report against TRL (PR 5594): -inf teacher padding gives finite gradients."""

from __future__ import annotations

import math

import pytest
import torch

import tropd
import tropd.torch as tt
from helpers import PROMPT, padded_batch, topk_lists


@pytest.fixture
def batch():
    return padded_batch(B=2, T=6, V=11, seed=51)


def call(b, **kw):
    args = dict(objective=tropd.presets.opd(), teacher_logits=b["u"])
    args.update(kw)
    z = args.pop("z", b["z"])
    return tt.distill_loss(z, args.pop("ids", b["ids"]), args.pop("origin", b["origin"]), **args)


def test_shape_errors(batch):
    with pytest.raises(ValueError, match="token_ids has shape"):
        call(batch, ids=batch["ids"][:, :-1])
    with pytest.raises(ValueError, match="origin has shape"):
        call(batch, origin=batch["origin"][:1])
    with pytest.raises(ValueError, match="student_logits must be"):
        call(batch, z=batch["z"][0, 0])
    with pytest.raises(ValueError, match="vocabulary"):
        call(batch, teacher_logits=batch["u"][..., :-1])
    with pytest.raises(ValueError, match="seq_offsets is for the packed layout"):
        call(batch, seq_offsets=torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="seq_offsets must start at 0 and end at n"):
        n = 12
        tt.distill_loss(batch["z"].reshape(n, -1), batch["ids"].reshape(n), batch["origin"].reshape(n), objective=tropd.presets.opd(),
                        teacher_logits=batch["u"].reshape(n, -1), seq_offsets=torch.tensor([0, 5, 11]))  # fmt: skip


def test_id_out_of_range_names_row_and_column(batch):
    ids = batch["ids"].clone()
    ids[1, 4] = 11  # V = 11
    with pytest.raises(tropd.InvalidInputError) as e:
        call(batch, ids=ids)
    assert isinstance(e.value, ValueError)
    assert e.value.code == "id_out_of_range" and e.value.row == 10 and e.value.column == 11
    assert (e.value.sequence, e.value.position) == (1, 4)
    assert "row 10, column 11" in str(e.value) and "sequence 1, position 4" in str(e.value)


def test_dtype_and_device_errors(batch):
    with pytest.raises(ValueError, match="float32, float64, bfloat16 or float16"):
        call(batch, z=batch["z"].to(torch.int32), teacher_logits=batch["u"].to(torch.int32))
    with pytest.raises(ValueError, match="student logits' dtype"):
        call(batch, teacher_logits=batch["u"].float())
    with pytest.raises(ValueError, match="not floats"):
        call(batch, origin=batch["origin"].double())
    with pytest.raises(ValueError, match="same device"):
        call(batch, teacher_logits=torch.empty(batch["u"].shape, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="unit stride"):
        n = 12
        z = batch["z"].reshape(n, -1).t().contiguous().t()  # [N, V] with stride 1 along N: not readable as rows
        tt.distill_loss(z, batch["ids"].reshape(n), batch["origin"].reshape(n), objective=tropd.presets.opd(),
                        teacher_logits=batch["u"].reshape(n, -1))  # fmt: skip
    with pytest.raises(TypeError):
        call(batch, objective="tropd")


def test_objective_and_input_combinations(batch):
    t = torch.log_softmax(batch["u"], -1).gather(-1, batch["ids"][..., None])[..., 0]
    with pytest.raises(ValueError, match="top-k lists"):
        call(batch, objective=tropd.presets.tropd(), teacher_logits=None, teacher_token_logprobs=t)
    with pytest.raises(ValueError, match="teacher's full distribution"):
        call(batch, objective=tropd.presets.gkd(), teacher_logits=None, teacher_token_logprobs=t)
    ids, lp = topk_lists(batch["u"], 4)
    with pytest.raises(ValueError, match="differs from the objective's k"):
        call(batch, objective=tropd.presets.tropd(k=8), teacher_logits=None, teacher_token_logprobs=t, teacher_topk_ids=ids,
             teacher_topk_logprobs=lp)  # fmt: skip
    with pytest.raises(ValueError, match="teacher is missing"):
        call(batch, teacher_logits=None)
    with pytest.raises(ValueError, match="needs logits"):
        tt.distill_loss_from_logprobs(t, t, batch["origin"], objective=tropd.presets.gkd())
    with pytest.raises(ValueError, match="student entropies"):
        tt.distill_loss_from_logprobs(t, t, batch["origin"], objective=tropd.presets.entropy_opd())
    with pytest.raises(ValueError, match="k must be >= 1"):
        tropd.presets.tropd(k=0)
    with pytest.raises(ValueError, match="no field"):
        tropd.evaluate_rows("tropd;kk=3", batch["z"].reshape(12, -1).numpy(), batch["ids"].reshape(12).int().numpy(),
                            batch["origin"].reshape(12).to(torch.uint8).numpy(), torch.tensor([0, 12]).numpy(),
                            teacher_logits=batch["u"].reshape(12, -1).numpy())  # fmt: skip


def test_duplicate_topk_id(batch):
    t = torch.log_softmax(batch["u"], -1).gather(-1, batch["ids"][..., None])[..., 0]
    ids, lp = topk_lists(batch["u"], 4)
    ids = ids.clone()
    ids[1, 3, 2] = ids[1, 3, 0]
    with pytest.raises(tropd.InvalidInputError) as e:
        call(batch, objective=tropd.presets.tropd(k=4), teacher_logits=None, teacher_token_logprobs=t, teacher_topk_ids=ids,
             teacher_topk_logprobs=lp)  # fmt: skip
    assert e.value.code == "duplicate_topk_id" and (e.value.sequence, e.value.position) == (1, 3)


def test_non_finite_logits_raise_and_write_nothing(batch):
    z = batch["z"].clone()
    z[0, 3, 5] = math.nan
    z.requires_grad_()
    with pytest.raises(tropd.EvaluationError) as e:
        loss, _ = call(batch, z=z)
        loss.backward()
    assert isinstance(e.value, RuntimeError)
    assert e.value.code == "non_finite_input" and e.value.row == 3 and e.value.column == 5
    assert z.grad is None
    # Opt-in: the bad row becomes a prompt row.
    loss, diag = call(batch, z=z, mask_bad_input=True)
    loss.backward()
    assert diag["n_masked_input"].item() == 1 and torch.isfinite(z.grad).all() and (z.grad[0, 3] == 0).all()


def test_zero_teacher_mass_on_a_trusted_token_is_a_runtime_error(batch):
    u = batch["u"].clone()
    u[1, 2, batch["ids"][1, 2]] = -math.inf
    with pytest.raises(RuntimeError, match="infinite divergence"):
        call(batch, teacher_logits=u)


def test_neg_inf_teacher_padding_gives_finite_gradients(batch):
    """TRL PR 5594: a teacher vocabulary padded with -inf made reverse-KL gradients NaN. Here the
    teacher logits carry -inf columns (vocabulary padding) and the served lists -inf entries; every
    objective that can take them gives a finite loss and finite gradients (and TrOPD routes a token
    the teacher gives zero mass to the outlier term instead of failing)."""
    B, T, V = batch["z"].shape
    u = batch["u"].clone()
    u[..., V - 3 :] = -math.inf  # 3 padded teacher columns
    ids = batch["ids"].clamp(max=V - 4)
    ids[1, 5] = V - 1  # TrOPD: R = -inf on this token -> an outlier
    for cfg in (tropd.presets.tropd(k=4, beta=0.05), tropd.presets.tropd(k=4, form="p"), tropd.presets.gkd(beta=0.5),
                tropd.presets.eopd(k=4), tropd.presets.opd()):  # fmt: skip
        the_ids = batch["ids"].clamp(max=V - 4) if cfg.preset in ("opd", "eopd") else ids
        z = batch["z"].clone().requires_grad_()
        loss, diag = tt.distill_loss(z, the_ids, batch["origin"], objective=cfg, teacher_logits=u, old_logprobs=batch["s_old"])
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), cfg
        if cfg.preset == "tropd":
            assert diag["n_zero_teacher_mass"].item() == 1
            assert (diag["flags"][1, 5] & tt.FLAG_BITS["outlier"]) != 0
    # Served lists with -inf padding entries (ids of padding entries are never read).
    t = torch.log_softmax(u, -1).gather(-1, ids[..., None])[..., 0]
    lid, lp = topk_lists(u, 6, pad=2)
    lid = torch.where(lp == -math.inf, torch.full_like(lid, -1), lid)
    z = batch["z"].clone().requires_grad_()
    loss, _ = tt.distill_loss(z, ids, batch["origin"], objective=tropd.presets.tropd(k=6, form="p", tail="tail_bucket"),
                              teacher_token_logprobs=t, teacher_topk_ids=lid, teacher_topk_logprobs=lp)  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_vllm_sampled_entry_is_handled(batch):
    """vLLM-style lists of K + 1 entries (the top-K plus the sampled token when it is not among
    them, else a -inf slot; shuffled): the same loss as the K lists with the token log-probs."""
    B, T, V = batch["z"].shape
    K = 4
    lt = torch.log_softmax(batch["u"], -1)
    t = lt.gather(-1, batch["ids"][..., None])[..., 0]
    ids, lp = topk_lists(batch["u"], K)
    in_topk = (ids == batch["ids"][..., None]).any(-1)
    extra_id = torch.where(in_topk, torch.zeros_like(batch["ids"]), batch["ids"])
    extra_lp = torch.where(in_topk, torch.full_like(t, -math.inf), t)
    ids1 = torch.cat([extra_id[..., None], ids], -1)  # the sampled entry first, as vLLM's dicts often are
    lp1 = torch.cat([extra_lp[..., None], lp], -1)
    cfg = tropd.presets.tropd(k=K, form="p", beta=0.05)
    l1, _ = call(batch, objective=cfg, teacher_logits=None, teacher_token_logprobs=t, teacher_topk_ids=ids, teacher_topk_logprobs=lp,
                 old_logprobs=batch["s_old"], seed=2)  # fmt: skip
    l2, _ = call(batch, objective=cfg, teacher_logits=None, teacher_topk_ids=ids1, teacher_topk_logprobs=lp1, topk_sampled_entry=True,
                 old_logprobs=batch["s_old"], seed=2)  # fmt: skip
    torch.testing.assert_close(l2, l1, rtol=1e-14, atol=0)  # the lists' order differs: summation order
    # Without the flag, K + 1 entries are refused (never silently treated as a longer top-k).
    with pytest.raises(ValueError, match="differs from the objective's k"):
        call(batch, objective=cfg, teacher_logits=None, teacher_token_logprobs=t, teacher_topk_ids=ids1, teacher_topk_logprobs=lp1)


def test_bad_values_of_small_inputs(batch):
    with pytest.raises(ValueError, match="origin tag"):
        call(batch, origin=torch.full_like(batch["origin"], 3))
    s_old = batch["s_old"].clone()
    s_old[0, 4] = math.inf
    with pytest.raises(RuntimeError, match="s_old is not finite"):
        call(batch, old_logprobs=s_old)
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        call(batch, normaliser=0.0)
    with pytest.raises(ValueError, match="temperature"):
        call(batch, student_temperature=0.0)


def test_empty_batch(batch):
    with pytest.raises(ValueError, match="no rows"):
        call(batch, z=batch["z"][:0], ids=batch["ids"][:0], origin=batch["origin"][:0], teacher_logits=batch["u"][:0])


def test_all_prompt_batch_is_a_zero_loss():
    b = padded_batch(B=1, T=4, V=5, seed=52)
    z = b["z"].clone().requires_grad_()
    loss, diag = tt.distill_loss(z, b["ids"], torch.full_like(b["origin"], PROMPT), objective=tropd.presets.tropd(k=2),
                                 teacher_logits=b["u"])  # fmt: skip
    loss.backward()
    assert loss.item() == 0 and (z.grad == 0).all() and diag["n_student"].item() == 0
    assert math.isnan(diag["trust_fraction"].item())  # undefined, never a stand-in value

