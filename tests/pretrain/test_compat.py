"""pretrain/compat.py directly: a model that does not fit a shard set is one error naming what differs and what
to do, for each way it can differ."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from distil.common.errors import UserError
from distil.data_pipeline.manifest import Manifest, ShardInfo, SpecialTokens
from distil.pretrain.compat import check_manifest_ids, check_model_fits, tokenizer_special_ids


def manifest(vocab=100, pad=0, max_len=64) -> Manifest:
    return Manifest(shards=[ShardInfo("train-0.tar", 10, 300)], holdout_shards=[], vocab_size=vocab,
                    special_tokens=SpecialTokens(pad=pad, cls=1, sep=2, mask=3, unk=4), max_len=max_len,
                    dtype="uint16", tokenizer_name="t", tokenizer_sha256="0")


def config(vocab=100, pad=0, max_pos=64, model_type="bert"):
    return SimpleNamespace(vocab_size=vocab, pad_token_id=pad, max_position_embeddings=max_pos, model_type=model_type)


def test_a_fitting_model_passes():
    check_model_fits("teacher", config(), manifest(), tokenizer_path=None, fix="re-run distil prepare")


@pytest.mark.parametrize(("model", "shards", "says"), [
    (config(vocab=120), manifest(), "teacher vocab_size 120 != shards' vocab_size 100: re-run"),
    (config(pad=5), manifest(), "teacher pad_token_id 5 != shards' pad id 0"),
    (config(max_pos=32), manifest(max_len=64), "holds 32 positions (max_position_embeddings 32) < shards' max_len 64"),
    # RoBERTa numbers positions from pad id + 1: 65 embeddings with pad 1 hold 63 tokens
    (config(max_pos=65, pad=1, model_type="roberta"), manifest(pad=1, max_len=64), "holds 63 positions"),
])
def test_each_mismatch_is_one_line_naming_it(model, shards, says):
    with pytest.raises(UserError) as e:
        check_model_fits("teacher", model, shards, tokenizer_path=None, fix="re-run distil prepare")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_roberta_holds_its_embeddings_less_the_padding_offset():
    check_model_fits("teacher", config(max_pos=66, pad=1, model_type="roberta"), manifest(pad=1, max_len=64),
                     tokenizer_path=None, fix="re-run distil prepare")


def test_a_tokenizer_whose_special_ids_differ_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(tmp_path)
    assert tokenizer_special_ids(str(tmp_path)) == {"pad": 1, "cls": 2, "sep": 3, "mask": 4, "unk": 0}
    assert tokenizer_special_ids(str(tmp_path / "missing")) == {} and tokenizer_special_ids(None) == {}
    with pytest.raises(UserError, match=r"tokenizer special token ids differ .*'pad': \(1, 0\)"):
        check_model_fits(str(tmp_path), config(), manifest(), tokenizer_path=str(tmp_path), fix="use its shards")


def test_special_ids_outside_the_vocabulary_are_refused():
    check_manifest_ids(manifest())
    with pytest.raises(UserError, match="outside its vocab_size 3"):
        check_manifest_ids(manifest(vocab=3))
