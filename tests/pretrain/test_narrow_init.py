"""student.narrow_init=pca: a student narrower than its teacher starts its embeddings from the teacher's top
principal directions, checked against numpy's fp64 SVD (by what the projection preserves, which does not depend
on the eigenvectors' signs), for every family; the default stays random; wrong settings are one error line."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from trainer_helpers import tiny_teacher

from distil.common.errors import UserError
from distil.pretrain import families, models
from distil.pretrain.config import StudentConfig

FAMILY_NAMES = list(families.FAMILIES)
NARROW = dict(num_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=24)


def _reference(teacher: torch.nn.Module, width: int):
    """numpy fp64: centred teacher words, their top-`width` right singular vectors and the rescaling."""
    words = teacher.get_input_embeddings().weight.detach().double().numpy()
    centred = words - words.mean(0)
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:width].T
    scale = words.std(ddof=1) / (centred @ basis).std(ddof=1)
    kept = (sing[:width] ** 2).sum() / (sing ** 2).sum()
    return centred, basis, scale, kept


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pca_start_matches_numpy_svd(family, caplog):
    teacher = tiny_teacher(family)
    with caplog.at_level(logging.INFO, logger="distil.pretrain.models"):
        student, _ = models.build_student(teacher, StudentConfig(**NARROW, narrow_init="pca"))
    centred, basis, scale, kept = _reference(teacher, 16)
    words = student.get_input_embeddings().weight.detach().double().numpy()
    assert words.shape == (centred.shape[0], 16)
    # Word-to-word inner products are those of the teacher's words within the top-16 principal subspace.
    want = scale ** 2 * (centred @ basis) @ (centred @ basis).T
    np.testing.assert_allclose(words @ words.T, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # Each kept direction's variance, largest first: the top singular values, rescaled.
    gram = np.diag(words.T @ words)
    _, sing, _ = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(gram, scale ** 2 * sing[:16] ** 2, rtol=1e-4)
    assert f"({100 * kept:.1f}% of their variance)" in caplog.text

    t_pos, s_pos = models._position_embeddings(teacher), models._position_embeddings(student)
    if t_pos is not None:  # BERT, RoBERTa, XLM-R, DistilBERT; ModernBERT has rotary positions
        pos = t_pos.weight.detach().double().numpy()[: s_pos.weight.shape[0]]
        got = s_pos.weight.detach().double().numpy() @ words.T
        want = scale ** 2 * (pos @ basis) @ (centred @ basis).T
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    else:
        assert family == "modernbert"

    t_decoder, t_bias = families.family_of(teacher).decoder(teacher)
    s_decoder, s_bias = families.family_of(student).decoder(student)
    assert torch.equal(s_decoder, student.get_input_embeddings().weight)
    if t_bias is not None:
        assert torch.equal(s_bias, t_bias)
    # Only the embeddings start from the teacher: the layers are random, and a student built with another seed
    # has other layers but the same embeddings.
    torch.manual_seed(123)
    again, _ = models.build_student(teacher, StudentConfig(**NARROW, narrow_init="pca"))
    assert torch.equal(again.get_input_embeddings().weight, student.get_input_embeddings().weight)
    layers = lambda m: [p for n, p in m.named_parameters() if ".layer" in n and p.dim() == 2]  # noqa: E731
    assert all(not torch.equal(a, b) for a, b in zip(layers(again), layers(student), strict=True))


def test_the_default_start_is_random_and_says_so(caplog):
    teacher = tiny_teacher("bert")
    with caplog.at_level(logging.WARNING, logger="distil.pretrain.models"):
        student, _ = models.build_student(teacher, StudentConfig(**NARROW))
    assert models.NARROW_INIT in caplog.text
    centred, basis, scale, _ = _reference(teacher, 16)
    words = student.get_input_embeddings().weight.detach().double().numpy()
    want = scale ** 2 * (centred @ basis) @ (centred @ basis).T
    assert not np.allclose(words @ words.T, want, rtol=1e-2)


def test_equal_widths_still_copy_the_teacher_whatever_narrow_init_says():
    teacher = tiny_teacher("roberta")
    student, _ = models.build_student(teacher, StudentConfig(num_layers=2, narrow_init="pca"))
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


def test_wrong_settings_are_one_error_line():
    teacher = tiny_teacher("bert")
    with pytest.raises(UserError) as e:
        models.build_student(teacher, StudentConfig(**NARROW, narrow_init="svd"))
    assert str(e.value) == "student.narrow_init='svd' is not one of random, pca, subclone: set one of those"
    wide = dict(NARROW, hidden_size=48, num_attention_heads=4)
    with pytest.raises(UserError) as e:
        models.build_student(teacher, StudentConfig(**wide, narrow_init="pca"))
    assert "\n" not in str(e.value)
    assert str(e.value).endswith("this student is 48 wide: set student.narrow_init=random")
