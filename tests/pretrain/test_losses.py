"""The recipe's objective, computed through the kernels on used rows only, equals an independent eager
computation with torch.nn losses on full-vocabulary logits (the reference's distiller.py step)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trainer_helpers import tiny_bert

from distil.pretrain.config import LossConfig, StudentConfig
from distil.pretrain.losses import DistillationObjective, MaskedLMObjective, projection_rows, teacher_outputs
from distil.pretrain.models import build_student


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    labels = torch.full_like(ids, -100)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    chosen[0, 3] = True
    labels[chosen] = ids[chosen]
    ids = ids.clone()
    ids[chosen] = 4  # [MASK]
    return ids, mask, labels


def reference_loss(student, teacher, ids, mask, labels, cfg: LossConfig):
    """The original distiller.py step, eagerly on full logits at every position."""
    s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    s_logits, t_logits = s_out.logits, t_out.logits
    sel = (labels != -100) if cfg.restrict_ce_to_mask else mask.bool()
    s_sel = s_logits[sel]
    t_sel = t_logits[sel]
    T = cfg.temperature
    kl = nn.KLDivLoss(reduction="batchmean")(
        nn.functional.log_softmax(s_sel / T, dim=-1), nn.functional.softmax(t_sel / T, dim=-1)) * T**2
    ce = nn.CrossEntropyLoss(ignore_index=-100)(s_logits.view(-1, s_logits.size(-1)), labels.view(-1))
    s_h = s_out.hidden_states[-1][mask.bool()]
    t_h = t_out.hidden_states[-1][mask.bool()]
    cos = nn.CosineEmbeddingLoss(reduction="mean")(s_h, t_h, torch.ones(s_h.shape[0]))
    mse = nn.MSELoss(reduction="sum")(s_sel, t_sel) / s_sel.size(0)
    total = cfg.alpha_ce * kl + cfg.alpha_mlm * ce + cfg.alpha_cos * cos + cfg.alpha_mse * mse
    return total, {"loss_kl": kl, "loss_mlm": ce, "loss_cos": cos, "loss_mse": mse}


def _pair():
    teacher = tiny_bert(layers=4, hidden=32)
    student, _ = build_student(teacher, StudentConfig(dropout=0.0, attention_dropout=0.0))
    with torch.no_grad():  # move the student away from the teacher so every term is non-trivial
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return teacher, student.train()


@pytest.mark.parametrize("cfg", [
    LossConfig(),
    LossConfig(restrict_ce_to_mask=True),
    LossConfig(temperature=3.0, alpha_ce=1.0, alpha_mlm=0.5, alpha_cos=2.0, alpha_mse=0.1),
    LossConfig(alpha_ce=0.0, alpha_cos=0.0),
], ids=["recipe", "restrict_ce_to_mask", "with_mse", "mlm_only"])
def test_objective_matches_reference_values_and_gradients(cfg):
    teacher, student = _pair()
    ids, mask, labels = make_batch()
    ref_total, ref_parts = reference_loss(student, teacher, ids, mask, labels, cfg)
    ref_grads = torch.autograd.grad(ref_total, list(student.parameters()), allow_unused=True)

    objective = DistillationObjective(student, teacher, cfg)
    out = objective(ids, mask, labels, teacher_outputs(teacher, ids, mask, labels, cfg))
    grads = torch.autograd.grad(out.loss, list(student.parameters()), allow_unused=True)

    torch.testing.assert_close(out.loss, ref_total, rtol=1e-5, atol=1e-5)
    expected = {"loss", "loss_mlm"} | {k for k, a in (("loss_kl", cfg.alpha_ce), ("loss_cos", cfg.alpha_cos),
                                                       ("loss_mse", cfg.alpha_mse)) if a > 0}
    assert set(out.parts) == expected
    for name, value in out.parts.items():
        if name != "loss":
            torch.testing.assert_close(value, ref_parts[name].detach(), rtol=1e-5, atol=1e-5, msg=name)
    for g, rg in zip(grads, ref_grads, strict=True):
        if rg is None:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


def test_projection_rows_never_include_padding():
    ids, mask, labels = make_batch()
    rows = projection_rows(mask, labels, LossConfig(), "distill")
    assert torch.equal(rows, mask.bool()) and int(rows.sum()) < mask.numel()
    restricted = projection_rows(mask, labels, LossConfig(restrict_ce_to_mask=True), "distill")
    assert torch.equal(restricted, labels != -100)
    assert torch.equal(projection_rows(mask, labels, LossConfig(), "mlm"), labels != -100)


def test_mlm_objective_matches_bert_masked_lm_loss():
    model = tiny_bert().train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ids, mask, labels = make_batch(1)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = MaskedLMObjective(model, LossConfig())(ids, mask, labels)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    g_ref = torch.autograd.grad(ref, [model.bert.embeddings.word_embeddings.weight])[0]
    g = torch.autograd.grad(out.loss, [model.bert.embeddings.word_embeddings.weight])[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
