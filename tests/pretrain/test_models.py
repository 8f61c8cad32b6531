"""Student construction: the recipe's layer mapping, weight copies, and the compatibility check."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import tiny_bert, tiny_manifest

from distil.common.errors import UserError
from distil.pretrain.config import StudentConfig, TeacherConfig
from distil.pretrain.models import (
    build_student,
    check_compatible,
    even_layer_map,
    load_teacher,
    resolve_layer_map,
)


def test_even_spacing_rule_gives_the_recipe_layers():
    assert even_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert even_layer_map(4, 2) == [0, 3]
    assert even_layer_map(24, 12)[0] == 0 and even_layer_map(24, 12)[-1] == 23
    assert resolve_layer_map(StudentConfig(), 12) == [0, 2, 4, 7, 9, 11]
    assert resolve_layer_map(StudentConfig(layers=[1, 5]), 12) == [1, 5]
    with pytest.raises(UserError, match="student.layers"):
        resolve_layer_map(StudentConfig(layers=[0, 12]), 12)


def _layer_tensors_teacher(t, i):
    layer = t.bert.encoder.layer[i]
    return [layer.attention.self.query.weight, layer.attention.self.key.bias, layer.attention.self.value.weight,
            layer.attention.output.dense.weight, layer.attention.output.LayerNorm.weight,
            layer.intermediate.dense.weight, layer.output.dense.bias, layer.output.LayerNorm.bias]


def _layer_tensors_student(s, i):
    layer = s.distilbert.transformer.layer[i]
    return [layer.attention.q_lin.weight, layer.attention.k_lin.bias, layer.attention.v_lin.weight,
            layer.attention.out_lin.weight, layer.sa_layer_norm.weight, layer.ffn.lin1.weight,
            layer.ffn.lin2.bias, layer.output_layer_norm.bias]


@pytest.mark.parametrize("layers", [None, [3, 1]])
def test_student_layer_i_equals_teacher_layer_map_i(layers):
    teacher = tiny_bert(layers=4)
    student, layer_map = build_student(teacher, StudentConfig(layers=layers))
    assert layer_map == (layers or [0, 3])
    assert student.config.n_layers == 2 and student.config.dim == teacher.config.hidden_size
    for s_idx, t_idx in enumerate(layer_map):
        for s_t, t_t in zip(_layer_tensors_student(student, s_idx), _layer_tensors_teacher(teacher, t_idx),
                            strict=True):
            assert torch.equal(s_t, t_t)
        other = [i for i in range(4) if i != t_idx][0]
        assert not torch.equal(_layer_tensors_student(student, s_idx)[0], _layer_tensors_teacher(teacher, other)[0])
    emb_t, emb_s = teacher.bert.embeddings, student.distilbert.embeddings
    assert torch.equal(emb_s.word_embeddings.weight, emb_t.word_embeddings.weight)
    assert torch.equal(emb_s.position_embeddings.weight, emb_t.position_embeddings.weight)
    assert torch.equal(emb_s.LayerNorm.weight, emb_t.LayerNorm.weight)
    assert torch.equal(student.vocab_projector.weight, teacher.cls.predictions.decoder.weight)
    assert torch.equal(student.vocab_projector.bias, teacher.cls.predictions.bias)
    # the head's transform is copied only by flag
    assert not torch.equal(student.vocab_transform.weight, teacher.cls.predictions.transform.dense.weight)
    student2, _ = build_student(teacher, StudentConfig(copy_vocab_transform=True))
    assert torch.equal(student2.vocab_transform.weight, teacher.cls.predictions.transform.dense.weight)
    assert torch.equal(student2.vocab_layer_norm.bias, teacher.cls.predictions.transform.LayerNorm.bias)


def test_full_copy_reproduces_teacher_outputs():
    """A student given every teacher layer (and the folded token-type embedding) computes the teacher's MLM."""
    teacher = tiny_bert(layers=2)
    student, _ = build_student(teacher, StudentConfig(layers=[0, 1], copy_vocab_transform=True,
                                                      fold_token_type_embeddings=True, dropout=0.0,
                                                      attention_dropout=0.0))
    student.eval()
    ids = torch.randint(5, 120, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits
        s = student(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(s[mask.bool()], t[mask.bool()], rtol=1e-4, atol=1e-4)


def test_random_init_option():
    teacher = tiny_bert(layers=4)
    student, _ = build_student(teacher, StudentConfig(init_from_teacher=False))
    assert not torch.equal(student.distilbert.transformer.layer[0].attention.q_lin.weight,
                           teacher.bert.encoder.layer[0].attention.self.query.weight)


def test_teacher_load_dtype_frozen_and_bare_bert_refused(tmp_path):
    teacher = tiny_bert()
    teacher.save_pretrained(tmp_path / "mlm")
    loaded = load_teacher(TeacherConfig(path=str(tmp_path / "mlm"), dtype="bf16"), need_logits=True)
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    teacher.bert.save_pretrained(tmp_path / "bare")  # a BertModel: no MLM head
    with pytest.raises(UserError, match="no trained MLM head"):
        load_teacher(TeacherConfig(path=str(tmp_path / "bare"), dtype="fp32"), need_logits=True)
    assert load_teacher(TeacherConfig(path=str(tmp_path / "bare"), dtype="fp32"), need_logits=False) is not None
    with pytest.raises(UserError, match="config.json"):
        load_teacher(TeacherConfig(path=str(tmp_path)), need_logits=True)


def test_compatibility_check():
    teacher = tiny_bert()
    student, _ = build_student(teacher, StudentConfig())
    check_compatible(tiny_manifest(), teacher, student, need_cosine=True)
    with pytest.raises(UserError, match="vocab_size 120 != shards' vocab_size 130"):
        check_compatible(tiny_manifest(vocab=130), teacher, student, need_cosine=True)
    bad = tiny_manifest()
    bad.special_tokens.pad = 7
    with pytest.raises(UserError, match="pad"):
        check_compatible(bad, teacher, student, need_cosine=True)
    with pytest.raises(UserError, match="max_len"):
        check_compatible(tiny_manifest(max_len=128), teacher, student, need_cosine=False)
    student.config.dim = 16
    with pytest.raises(UserError, match="alpha_cos"):
        check_compatible(tiny_manifest(), teacher, student, need_cosine=True)
