"""student.narrow_init=subclone: a narrower student starts from the teacher's most important residual
dimensions, whole attention heads and feed-forward neurons. Checked by planting which ones matter in a tiny
teacher and comparing every student tensor with the teacher's slice at indices the test writes out itself; at
the teacher's own widths the slice is the whole teacher, i.e. the layer-copy initialisation."""

from __future__ import annotations

import logging

import pytest
import torch
from trainer_helpers import tiny_teacher

from distil.common.errors import UserError
from distil.pretrain import models, subclone
from distil.pretrain.config import StudentConfig

FAMILIES = list(subclone.SUPPORTED)
HEAD = 8  # tiny teachers: 32 wide, 4 heads of 8, feed-forward 64, 4 layers
NARROW = dict(num_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=24)
DIMS = [1, 2, 5, 7, 8, 11, 13, 14, 17, 19, 20, 23, 26, 28, 29, 31]  # the 16 residual dimensions made to matter


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_at_the_teachers_widths_subclone_is_the_layer_copy(family):
    teacher = tiny_teacher(family)
    copy_cfg = dict(num_layers=2, copy_vocab_transform=True, fold_token_type_embeddings=True) if family == "bert" \
        else dict(num_layers=2)
    copied, layer_map = models.build_student(teacher, StudentConfig(**copy_cfg))
    student, _ = models.build_student(teacher, StudentConfig(num_layers=2, init_from_teacher=False))
    before = _state(student)
    subclone.subclone(student, teacher, layer_map)
    after, want = _state(student), _state(copied)
    assert after.keys() == want.keys()
    for key in want:
        assert torch.equal(after[key], want[key]), key
        if not key.endswith("position_ids"):
            assert not torch.equal(before[key], want[key]), f"{key} was already the teacher's: the test cannot tell"


def _plant(teacher, layer_map, heads, neurons):
    """Makes DIMS the residual dimensions with the largest LayerNorm gains, `heads[i]` the strongest heads and
    `neurons[i]` the strongest feed-forward neurons of mapped layer i."""
    parts = subclone._parts(teacher)
    with torch.no_grad():
        for norm in [parts.emb_norm] + [n for lay in parts.layers for n in (lay.attn_norm, lay.ffn_norm)]:
            norm.weight.mul_(0.5)
            norm.weight[DIMS] *= 3.0
        for i, t_idx in enumerate(layer_map):
            lay = parts.layers[t_idx]
            for h in heads[i]:
                lay.v.weight[h * HEAD:(h + 1) * HEAD] *= 3.0
            lay.ffn_in.weight[neurons[i]] *= 3.0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_narrow_student_is_the_teachers_slice(family, caplog):
    teacher = tiny_teacher(family)
    layer_map = [1, 3]
    heads = [[0, 3], [1, 2]]
    neurons = [list(range(0, 48, 2)), list(range(40, 64))]
    _plant(teacher, layer_map, heads, neurons)
    with caplog.at_level(logging.INFO, logger="distil.pretrain.models"):
        student, got_map = models.build_student(teacher, StudentConfig(**NARROW, layers=layer_map,
                                                                       narrow_init="subclone"))
    assert got_map == layer_map
    assert f"heads {heads}" in caplog.text and "16 of 32 residual dimensions" in caplog.text
    t, s = subclone._parts(teacher), subclone._parts(student)
    dims = torch.tensor(DIMS)
    assert torch.equal(s.words.weight, t.words.weight[:, dims])
    positions = t.positions.weight.clone()
    if s.token_types is None:  # DistilBERT student of BERT: token type 0 folded into the positions
        positions += t.token_types.weight[0] if t.token_types is not None else 0
    else:
        assert torch.equal(s.token_types.weight, t.token_types.weight[:, dims])
    assert torch.equal(s.positions.weight, positions[:, dims])
    for norm_s, norm_t in [(s.emb_norm, t.emb_norm), (s.head_norm, t.head_norm)]:
        assert torch.equal(norm_s.weight, norm_t.weight[dims]) and torch.equal(norm_s.bias, norm_t.bias[dims])
    for i, t_idx in enumerate(layer_map):
        sl, tl = s.layers[i], t.layers[t_idx]
        attn = torch.tensor([h * HEAD + j for h in heads[i] for j in range(HEAD)])
        ffn = torch.tensor(neurons[i])
        for a, b in ((sl.q, tl.q), (sl.k, tl.k), (sl.v, tl.v)):
            assert torch.equal(a.weight, b.weight[attn][:, dims]) and torch.equal(a.bias, b.bias[attn])
        assert torch.equal(sl.attn_out.weight, tl.attn_out.weight[dims][:, attn])
        assert torch.equal(sl.ffn_in.weight, tl.ffn_in.weight[ffn][:, dims])
        assert torch.equal(sl.ffn_in.bias, tl.ffn_in.bias[ffn])
        assert torch.equal(sl.ffn_out.weight, tl.ffn_out.weight[dims][:, ffn])
        for a, b in ((sl.attn_norm, tl.attn_norm), (sl.ffn_norm, tl.ffn_norm)):
            assert torch.equal(a.weight, b.weight[dims]) and torch.equal(a.bias, b.bias[dims])
    assert torch.equal(s.head_dense.weight, t.head_dense.weight[dims][:, dims])
    assert torch.equal(s.head_bias, t.head_bias)
    assert s.decoder.data_ptr() == s.words.weight.data_ptr()  # still tied to the sliced words


def test_a_fp16_teacher_gives_the_fp32_student_its_rounded_weights_exactly():
    """The trainer loads the teacher in fp16 (the recipe's teacher.dtype): the student holds those values in fp32,
    the token-type fold summed in fp32."""
    teacher = tiny_teacher("bert")
    half = tiny_teacher("bert").half()
    student, _ = models.build_student(half, StudentConfig(**NARROW, layers=[1, 3], narrow_init="subclone"))
    reference, _ = models.build_student(teacher, StudentConfig(**NARROW, layers=[1, 3], narrow_init="subclone"))
    assert all(p.dtype == torch.float32 for p in student.parameters())
    t, s = subclone._parts(half), subclone._parts(student)
    keep = subclone.residual_dims(t, 16)
    want = (t.positions.weight.float() + t.token_types.weight[0].float())[:, keep]
    assert torch.equal(s.positions.weight, want)
    assert torch.equal(s.layers[0].q.weight, t.layers[1].q.weight.float()[
        torch.cat([torch.arange(h * HEAD, (h + 1) * HEAD) for h in subclone.top_heads(t.layers[1], HEAD, 2)])][:, keep])
    # the same slice as from the fp32 teacher, up to fp16 rounding
    torch.testing.assert_close(s.words.weight, subclone._parts(reference).words.weight, rtol=1e-3, atol=1e-4)


def test_subclone_starts_nearer_the_teacher_than_a_random_start():
    """What the rule is for: on the teacher's own inputs, the sliced student's masked-LM distribution is closer to
    the teacher's than a randomly started student's (the planted teacher leans on the kept dimensions)."""
    teacher = tiny_teacher("bert", seed=3)
    layer_map = [1, 3]
    _plant(teacher, layer_map, [[0, 3], [1, 2]], [list(range(24)), list(range(24))])
    ids = torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(0))

    def kl(student):
        with torch.no_grad():
            p = torch.log_softmax(teacher(input_ids=ids).logits.double(), -1)
            q = torch.log_softmax(student.eval()(input_ids=ids).logits.double(), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    sliced, _ = models.build_student(teacher, StudentConfig(**NARROW, layers=layer_map, narrow_init="subclone"))
    random_start, _ = models.build_student(teacher, StudentConfig(**NARROW, layers=layer_map))
    assert kl(sliced) < 0.5 * kl(random_start)


@pytest.mark.parametrize("change, message", [
    (dict(num_attention_heads=4), "student.narrow_init=subclone keeps whole teacher heads of size 8: set "
                                  "student.num_attention_heads=2 for student.hidden_size=16 (not 4)"),
    (dict(hidden_size=12, num_attention_heads=2), "student.narrow_init=subclone keeps whole teacher heads of size 8: "
                                                  "set student.hidden_size to a multiple of 8 (not 12)"),
    (dict(intermediate_size=96), "student.narrow_init=subclone keeps a subset of the teacher's weights, but "
                                 "student.intermediate_size=96 is wider than the teacher's 64: set it to 64 or less, "
                                 "or set student.narrow_init=random"),
])
def test_shapes_it_cannot_slice_are_one_error_line(change, message):
    with pytest.raises(UserError) as e:
        models.build_student(tiny_teacher("bert"), StudentConfig(**dict(NARROW, **change), narrow_init="subclone"))
    assert str(e.value) == message


def test_modernbert_is_refused_in_one_line():
    with pytest.raises(UserError) as e:
        models.build_student(tiny_teacher("modernbert"), StudentConfig(**NARROW, narrow_init="subclone"))
    assert str(e.value) == ("student.narrow_init=subclone slices separate query/key/value weights and post-LN "
                            "LayerNorms, which a ModernBERT does not have: set student.narrow_init=pca or random")
