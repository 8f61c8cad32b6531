"""pretrain/families.py and the family-aware parts of pretrain/models.py: each family's body, head and
projection reproduce its own transformers forward; students of each family are initialised layer for layer;
MLM-mode models of each family are built from the shards; other families are refused in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from trainer_helpers import FAMILY_SPECIALS, VOCAB, family_manifest, tiny_teacher

from distil.common.errors import UserError
from distil.pretrain import families, models
from distil.pretrain.config import ArchConfig, LossConfig, StudentConfig, TeacherConfig
from distil.pretrain.losses import DistillationObjective, teacher_outputs

FAMILY_NAMES = list(families.FAMILIES)


def batch(family: str, seed: int = 1, rows: int = 3, length: int = 12):
    """Token ids with the family's [CLS]/[SEP] around random words and the last row padded."""
    sp = FAMILY_SPECIALS[family]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB - 1, (rows, length), generator=g)
    ids[:, 0] = sp.cls
    ids[:, -1] = sp.sep
    mask = torch.ones_like(ids)
    ids[-1, 7:] = sp.pad
    ids[-1, 6] = sp.sep
    mask[-1, 7:] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_body_head_and_projection_give_the_models_own_logits(family):
    """What the loss computes from family.body/head_input/decoder is what transformers' forward computes."""
    model = tiny_teacher(family).double()
    ids, mask = batch(family)
    f = families.family_of(model)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        hidden = f.body(model)(input_ids=ids, attention_mask=mask)[0]
        weight, bias = f.decoder(model)
        ours = torch.nn.functional.linear(f.head_input(model, hidden), weight, bias)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], expected[keep], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_student_with_every_teacher_layer_is_the_teacher(family):
    """Same-family initialisation copies every weight: with all layers mapped the student's logits are the
    teacher's (BERT -> DistilBERT too, with the token-type embedding folded into the positions)."""
    teacher = tiny_teacher(family)
    fold = family == "bert"
    cfg = StudentConfig(layers=list(range(4)), dropout=0.0, attention_dropout=0.0, fold_token_type_embeddings=fold,
                        copy_vocab_transform=fold)
    student, layer_map = models.build_student(teacher, cfg)
    student = student.eval()
    assert layer_map == [0, 1, 2, 3]
    ids, mask = batch(family)
    with torch.no_grad():
        t, s = teacher(input_ids=ids, attention_mask=mask).logits, student(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    if fold:  # another architecture: the same sums in another order (and the folded embedding rounded once)
        torch.testing.assert_close(s[keep], t[keep], rtol=0, atol=1e-5)
    else:  # the teacher's own architecture and weights: the same computation, bit for bit
        assert torch.equal(s[keep], t[keep])


@pytest.mark.parametrize(("family", "student_type"), [("bert", "distilbert"), ("distilbert", "distilbert"),
                                                      ("roberta", "roberta"), ("xlm-roberta", "xlm-roberta"),
                                                      ("modernbert", "modernbert")])
def test_the_student_follows_its_teachers_family_and_takes_the_mapped_layers(family, student_type):
    teacher = tiny_teacher(family)
    student, layer_map = models.build_student(teacher, StudentConfig())
    assert student.config.model_type == student_type
    assert layer_map == [0, 3]  # first and last, the even-spacing rule
    assert student.config.num_hidden_layers == 2
    assert all(p.dtype == torch.float32 for p in student.parameters())
    if student_type == family:  # layer i of the student is teacher layer layer_map[i], weight for weight
        f = families.family_of(teacher)
        t_state = teacher.state_dict()
        for key, value in student.state_dict().items():
            m = f.layer_key.match(key)
            src = f"{m.group(1)}{layer_map[int(m.group(2))]}{m.group(3)}" if m else key
            assert torch.equal(value, t_state[src]), key
    if family == "modernbert":  # each layer keeps its attention kind (global every 2nd layer in the teacher)
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in layer_map]


def test_student_family_can_name_the_teachers_own_or_distilbert_for_bert():
    bert_student, _ = models.build_student(tiny_teacher("bert"), StudentConfig(family="bert"))
    assert bert_student.config.model_type == "bert" and bert_student.config.num_hidden_layers == 2
    with pytest.raises(UserError, match=r"student.family='distilbert' cannot be initialised from a RoBERTa teacher"):
        models.build_student(tiny_teacher("roberta"), StudentConfig(family="distilbert"))
    with pytest.raises(UserError, match=r"choose 'auto' or 'roberta'"):
        models.build_student(tiny_teacher("roberta"), StudentConfig(family="bert"))


def test_a_modernbert_student_must_start_with_layer_0():
    with pytest.raises(UserError, match=r"start the list with 0"):
        models.build_student(tiny_teacher("modernbert"), StudentConfig(layers=[1, 3]))


def test_folding_token_types_is_refused_outside_bert_to_distilbert():
    with pytest.raises(UserError, match=r"fold_token_type_embeddings applies to a BERT -> DistilBERT student only"):
        models.build_student(tiny_teacher("roberta"), StudentConfig(fold_token_type_embeddings=True))


def test_a_teacher_of_another_family_is_refused_naming_the_families(tmp_path):
    from transformers import ElectraConfig, ElectraForMaskedLM

    ElectraForMaskedLM(ElectraConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, embedding_size=16)).save_pretrained(tmp_path / "electra")
    with pytest.raises(UserError) as e:
        models.load_teacher(TeacherConfig(path=str(tmp_path / "electra")), need_logits=True)
    message = str(e.value)
    assert "'electra'" in message and "bert, distilbert, roberta, xlm-roberta, modernbert" in message
    assert "\n" not in message


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_saved_teacher_of_each_family_loads_frozen_in_its_dtype(family, tmp_path):
    tiny_teacher(family).save_pretrained(tmp_path / family)
    teacher = models.load_teacher(TeacherConfig(path=str(tmp_path / family), dtype="bf16"), need_logits=True)
    assert families.family_of(teacher).name == family
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_teacher_without_its_head_is_refused_when_logits_are_needed(family, tmp_path):
    model = tiny_teacher(family)
    families.family_of(model).body(model).save_pretrained(tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert config["model_type"] == family
    with pytest.raises(UserError, match=r"has no trained MLM head"):
        models.load_teacher(TeacherConfig(path=str(tmp_path / "bare")), need_logits=True)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_mlm_mode_builds_each_family_from_the_shards(family):
    manifest = family_manifest(family, max_len=64)
    arch = ArchConfig(family=family, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, local_attention=8)
    model = models.build_mlm_model(arch, manifest)
    assert model.config.model_type == family and model.config.vocab_size == VOCAB
    assert model.config.pad_token_id == manifest.special_tokens.pad
    assert families.usable_positions(model.config) == 64  # RoBERTa's offset added to its embeddings
    models.check_compatible(manifest, None, model, need_cosine=False)
    ids, mask = batch(family, length=64)
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.shape == (3, 64, VOCAB)


def test_mlm_mode_refuses_an_unknown_family():
    with pytest.raises(UserError, match=r"model.family is 'electra': distil works with the families bert"):
        models.build_mlm_model(ArchConfig(family="electra"), family_manifest("bert"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_recipe_objective_trains_a_student_of_each_family(family):
    """KL + MLM + cosine over a padded batch: finite, and a few steps of AdamW lower it."""
    teacher = tiny_teacher(family)
    student, _ = models.build_student(teacher, StudentConfig(dropout=0.0, attention_dropout=0.0,
                                                             init_from_teacher=False))
    models.check_compatible(family_manifest(family), teacher, student, need_cosine=True)
    cfg = LossConfig()
    objective = DistillationObjective(student, teacher, cfg)
    assert not any(p is q for p in objective.parameters() for q in teacher.parameters())
    ids, mask = batch(family)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    ids = ids.clone()
    ids[:, 3] = FAMILY_SPECIALS[family].mask
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = objective(ids, mask, labels, teacher_outputs(teacher, ids, mask, labels, cfg))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert set(out.parts) == {"loss_kl", "loss_mlm", "loss_cos", "loss"}
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_padding_does_not_change_the_real_tokens(family):
    """A row's hidden states are the same alone and padded in a batch (ModernBERT included: its attention
    runs on the padded batch with a mask on CPU), so the loss never depends on a batch's padding."""
    model = tiny_teacher(family).double()
    ids, mask = batch(family, length=12)
    body = families.family_of(model).body(model)
    with torch.no_grad():
        padded = body(input_ids=ids, attention_mask=mask)[0]
        alone = body(input_ids=ids[-1:, :7], attention_mask=mask[-1:, :7])[0]
    torch.testing.assert_close(padded[-1, :7], alone[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "modernbert", "distilbert"])
def test_shards_of_another_tokenizer_layout_are_refused_before_any_work(family, tmp_path):
    """A teacher whose special ids differ from the shards' (BERT-layout shards for a RoBERTa teacher, RoBERTa-
    layout shards for the others) is one line naming what differs, from the config or the saved tokenizer."""
    other = "bert" if family in ("roberta", "xlm-roberta") else "roberta"
    teacher = tiny_teacher(family)
    with pytest.raises(UserError) as e:
        models.check_compatible(family_manifest(other), teacher, None, need_cosine=False)
    assert "pad_token_id" in str(e.value) and "\n" not in str(e.value)
    if family in ("roberta", "xlm-roberta"):  # same pad id, another mask id: told by the saved tokenizer
        from family_tokenizers import large_unigram_tokenizer

        folder = tmp_path / "teacher"
        teacher.save_pretrained(folder)
        large_unigram_tokenizer(folder, ["the", "quick", "fox"], vocab_size=VOCAB)
        shards = family_manifest(family)
        wrong = dataclasses.replace(shards, special_tokens=dataclasses.replace(shards.special_tokens, mask=7))
        with pytest.raises(UserError, match=r"tokenizer special token ids differ from the shards' .*'mask': \(119, 7\)"):
            models.check_compatible(wrong, teacher, None, need_cosine=False, teacher_path=str(folder))
        models.check_compatible(shards, teacher, None, need_cosine=False, teacher_path=str(folder))
