"""pretrain/layer_losses.py: each loss against an fp64 computation written out term by term (row by row, per
dtype, gradients under a loss scale), the memory-lean relations equal to the reference, the query/key/value
capture of every family, the plan's refusals, and each loss training a narrower student."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from trainer_helpers import FAMILY_SPECIALS, VOCAB, family_manifest, tiny_teacher

from distil.common.errors import UserError
from distil.pretrain import families, layer_losses, models
from distil.pretrain.config import LossConfig, StudentConfig
from distil.pretrain.layer_losses import LayerPlan
from distil.pretrain.losses import DistillationObjective, encoder_forward, teacher_outputs

SCALE = 2.0**12  # gradients are compared as the fp16 engine makes them: of loss x scale, then unscaled
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def padded_mask(b=2, length=7):
    mask = torch.ones(b, length, dtype=torch.long)
    mask[-1, 4:] = 0
    return mask


def naive_relation_kl(s, t, mask, heads):
    """fp64, one (batch, head, query) row at a time, as MiniLMv2 writes it."""
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        valid = [j for j in range(s.shape[1]) if mask[b, j]]
        for r in range(heads):
            ds, dt = s.shape[-1] // heads, t.shape[-1] // heads
            xs = s[b, valid, r * ds : (r + 1) * ds].double()
            xt = t[b, valid, r * dt : (r + 1) * dt].double()
            ps = torch.softmax(xs @ xs.T / math.sqrt(ds), -1)
            pt = torch.softmax(xt @ xt.T / math.sqrt(dt), -1)
            total = total + (pt * (pt.log() - ps.log())).sum()
            rows += len(valid)
    return total / rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hidden_losses_match_fp64_row_by_row_with_gradients_under_the_loss_scale(dtype):
    g = torch.Generator().manual_seed(0)
    s64, t64 = torch.randn(9, 16, generator=g, dtype=torch.float64), torch.randn(9, 16, generator=g, dtype=torch.float64)
    for fn, reference in ((layer_losses.hidden_mse, lambda s, t: ((s - t) ** 2).mean()),
                          (layer_losses.hidden_cosine,
                           lambda s, t: (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean())):
        s = s64.to(dtype).requires_grad_()
        t = t64.to(dtype)
        loss = fn(s, t)
        (loss * SCALE).backward()
        s_ref = s.detach().double().requires_grad_()
        expected = reference(s_ref, t.double())
        expected.backward()
        assert loss.dtype == torch.float32
        assert abs(loss.item() - expected.item()) <= TOL[dtype] * max(1.0, abs(expected.item()))
        grad = s.grad.double() / SCALE
        for row in range(9):  # row by row: a few rows cannot hide in one norm
            torch.testing.assert_close(grad[row], s_ref.grad[row], rtol=TOL[dtype] * 10, atol=TOL[dtype] / 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_relation_kl_matches_fp64_and_the_lean_form_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(1)
    s64 = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    t64 = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    mask = padded_mask()
    s = s64.to(dtype).requires_grad_()
    loss = layer_losses.relation_kl(s, t64.to(dtype), mask, heads=3)
    (loss * SCALE).backward()
    s_ref = s.detach().double().requires_grad_()
    expected = naive_relation_kl(s_ref, t64.to(dtype).double(), mask, 3)
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 10 * TOL[dtype] * max(1.0, expected.item())
    grad = s.grad.double() / SCALE
    for b in range(2):
        for j in range(7):
            torch.testing.assert_close(grad[b, j], s_ref.grad[b, j], rtol=0.05, atol=20 * TOL[dtype])
    assert torch.all(grad[-1, 4:] == 0)  # padding positions get no gradient
    lean_s = s.detach().clone().requires_grad_()
    lean = layer_losses.relation_kl_lean(lean_s, t64.to(dtype), mask, heads=3)
    (lean * SCALE).backward()
    torch.testing.assert_close(lean, loss.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(lean_s.grad, s.grad, rtol=1e-5, atol=1e-6)


def test_attention_kl_matches_fp64():
    g = torch.Generator().manual_seed(2)
    mask = padded_mask()
    scores_s, scores_t = torch.randn(2, 2, 7, 7, generator=g), torch.randn(2, 2, 7, 7, generator=g)
    keys = ~mask.bool()[:, None, None, :]
    s = torch.softmax(scores_s.masked_fill(keys, -1e9), -1)
    t = torch.softmax(scores_t.masked_fill(keys, -1e9), -1)
    loss = layer_losses.attention_kl(s, t, mask)
    total, rows = 0.0, 0
    for b in range(2):
        for h in range(2):
            for q in range(7):
                if mask[b, q]:
                    ps, pt = s[b, h, q].double(), t[b, h, q].double()
                    keep = mask[b].bool()
                    total += float((pt[keep] * (pt[keep].log() - ps[keep].log())).sum())
                    rows += 1
    assert loss.item() == pytest.approx(total / rows, rel=1e-5)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_query_key_value_capture_of_every_family(family):
    """The captured projections are the layer's own: q of the relation layer is its query Linear applied to
    the hidden states entering it (for ModernBERT after its attention norm: checked by shape and by the
    fused projection's output split in three)."""
    model = tiny_teacher(family)
    f = families.family_of(model)
    ids = torch.randint(5, VOCAB - 1, (2, 9))
    mask = padded_mask(2, 9)
    plan_like = type("P", (), {"hidden_states": True, "attentions": False})()
    with torch.no_grad():
        out, qkv = encoder_forward(model, ids, mask, plan_like, 1)
    assert len(qkv) == 3 and all(x.shape == (2, 9, 32) for x in qkv)
    if family != "modernbert":
        query = f.qkv(f.layers(model)[1])[0]
        with torch.no_grad():
            torch.testing.assert_close(qkv[0], query(out.hidden_states[1]))


def plan_for(student_cfg: StudentConfig, **loss) -> LayerPlan:
    teacher = tiny_teacher("bert")
    student, _ = models.build_student(teacher, student_cfg)
    return LayerPlan(LossConfig(alpha_cos=0, **loss), teacher.config, student.config)


@pytest.mark.parametrize(("student", "loss", "says"), [
    (StudentConfig(), {"alpha_hidden": 1, "hidden_layers": [2, 4, 1]}, "lists 3 teacher layers but the student has 2"),
    (StudentConfig(), {"alpha_hidden": 1, "hidden_layers": [2, 5]}, "loss.hidden_layers has [5]: the teacher has layers 1..4"),
    (StudentConfig(hidden_size=24, num_attention_heads=4), {"alpha_relations": 1, "relation_heads": 5},
     "loss.relation_heads=5 must divide both hidden sizes (teacher 32, student 24): choose a common divisor, e.g. 8"),
    (StudentConfig(), {"alpha_relations": 1, "relation_layer": 9}, "loss.relation_layer=9: the teacher has layers 1..4"),
    (StudentConfig(hidden_size=16, num_attention_heads=2), {"alpha_attention": 1},
     "loss.alpha_attention > 0 needs equal head counts: teacher 4, student 2"),
])
def test_impossible_layer_losses_are_one_line_before_any_work(student, loss, says):
    with pytest.raises(UserError) as e:
        plan_for(student, **loss)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_cosine_of_the_recipe_across_widths_points_to_the_projected_loss():
    teacher = tiny_teacher("bert")
    student, _ = models.build_student(teacher, StudentConfig(hidden_size=16, num_attention_heads=2))
    with pytest.raises(UserError, match=r"use loss.alpha_hidden with loss.hidden_loss=cosine"):
        models.check_compatible(family_manifest("bert"), teacher, student, need_cosine=True)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_students_of_any_shape_for_every_family(family):
    teacher = tiny_teacher(family)
    cfg = StudentConfig(num_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=24)
    student, layer_map = models.build_student(teacher, cfg)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (3, 16, 2)
    assert families.ffn_width(c) == 24
    ids = torch.randint(5, VOCAB - 1, (2, 9))
    ids[:, 0] = FAMILY_SPECIALS[family].cls
    with torch.no_grad():
        assert student(input_ids=ids, attention_mask=padded_mask(2, 9)).logits.shape == (2, 9, VOCAB)


@pytest.mark.parametrize("loss", [
    {"alpha_hidden": 1.0, "hidden_layers": [2, 4], "hidden_embeddings": True},
    {"alpha_hidden": 1.0, "hidden_loss": "cosine"},
    {"alpha_relations": 1.0, "relation_heads": 4, "relation_layer": 3},
    {"alpha_attention": 1.0, "hidden_layers": [2, 4]},
])
def test_each_layer_loss_alone_trains_a_narrower_student(loss):
    """KL and MLM off: the layer loss alone falls; its projections are objective parameters, not the
    student's (so they are checkpointed with the engine and left out of the export)."""
    teacher = tiny_teacher("bert")
    heads = 4 if "alpha_attention" in loss else 2
    student, _ = models.build_student(teacher, StudentConfig(hidden_size=16, num_attention_heads=heads,
                                                             intermediate_size=32, dropout=0.0, attention_dropout=0.0))
    cfg = replace(LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0), **loss)
    objective = DistillationObjective(student, teacher, cfg)
    projections = {id(p) for p in objective.plan.parameters()}
    assert bool(projections) == ("alpha_hidden" in loss)
    assert not projections & {id(p) for p in student.parameters()}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB - 1, (4, 12), generator=g)
    mask = padded_mask(4, 12)
    labels = torch.full_like(ids, -100)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-2)
    curve = []
    for _ in range(15):
        out = objective(ids, mask, labels, teacher_outputs(teacher, ids, mask, labels, cfg, objective.plan))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        curve.append(out.loss.item())
    name = {"alpha_hidden": "loss_hidden", "alpha_relations": "loss_relations", "alpha_attention": "loss_attention"}
    key = next(v for k, v in name.items() if k in loss)
    assert key in out.parts and all(math.isfinite(x) for x in curve)
    assert curve[-1] < 0.8 * curve[0], curve


@pytest.mark.parametrize("name", ["minilm_6x384_relations.yaml", "tinybert_4x312_general.yaml"])
def test_the_shipped_narrow_recipes_fit_a_bert_base_shaped_teacher(name):
    """Their student and loss sections against bert-base-uncased's shape (random weights: no hub here)."""
    from pathlib import Path

    from transformers import BertConfig, BertForMaskedLM

    from distil.pretrain.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / name, ["data.shards=s"])
    teacher = BertForMaskedLM(BertConfig())
    student, _ = models.build_student(teacher, cfg.student)
    plan = LayerPlan(cfg.loss, teacher.config, student.config)
    width = {"minilm_6x384_relations.yaml": 384, "tinybert_4x312_general.yaml": 312}[name]
    assert student.config.model_type == "bert" and student.config.hidden_size == width
    assert plan.relations == name.startswith("minilm") and plan.attentions == name.startswith("tinybert")
    if plan.hidden_states:
        assert plan.hidden_pairs == [(0, 0), (3, 1), (6, 2), (9, 3), (12, 4)] and len(plan.projections) == 5


def test_relations_refuse_a_modernbert_under_unpadded_flash_attention():
    teacher = tiny_teacher("modernbert")
    student, _ = models.build_student(teacher, StudentConfig(hidden_size=16, num_attention_heads=2))
    teacher.config._attn_implementation = "flash_attention_2"  # as loaded on a GPU with flash-attn installed
    with pytest.raises(UserError, match=r"ModernBERT under flash-attention"):
        DistillationObjective(student, teacher, LossConfig(alpha_cos=0, alpha_relations=1, relation_heads=2))
