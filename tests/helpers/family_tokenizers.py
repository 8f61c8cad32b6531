"""Tokenizers of the non-BERT kinds, built inside the tests: an XLM-R-style SentencePiece Unigram (trained on
the test corpus, or with a 250,002-entry vocabulary whose words sit above id 65,535) and a RoBERTa-style
byte-level BPE (distil's own trainer)."""

from __future__ import annotations

import json
from pathlib import Path

from distil.data_pipeline.prepare.tokenize import ROBERTA_SPECIALS, roberta_layout, train_byte_level_bpe

XLMR_VOCAB = 250_002  # XLM-RoBERTa's vocabulary size


def _unigram_pipeline(tok) -> None:
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()


def unigram_tokenizer(folder: Path, lines: list[str], vocab_size: int = 300) -> Path:
    """An XLM-R-style tokenizer (Unigram, "▁" word marks, <s> <pad> </s> <unk> ... <mask>) trained on `lines`."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    _unigram_pipeline(tok)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - 1, special_tokens=list(ROBERTA_SPECIALS),
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(lines, trainer)
    roberta_layout(tok, XLMRobertaTokenizerFast).save_pretrained(str(folder))
    return folder


def large_unigram_tokenizer(folder: Path, words: list[str], vocab_size: int = XLMR_VOCAB) -> Path:
    """A Unigram tokenizer of `vocab_size` entries (<mask> the last) whose pieces for `words` (and their
    letters) have ids above 200,000: every id the corpus produces needs more than 16 bits."""
    from tokenizers import Tokenizer, models
    from transformers import XLMRobertaTokenizerFast

    letters = sorted({c for w in words for c in w} | {c.upper() for w in words for c in w} | set(".,;:!?'-0123456789"))
    real = [f"▁{w}" for w in words] + [f"▁{w.capitalize()}" for w in words] + ["▁", *letters]
    filler = vocab_size - 1 - len(ROBERTA_SPECIALS) - len(real)
    vocab = ([(s, 0.0) for s in ROBERTA_SPECIALS] + [(f"▁filler{i}", -20.0) for i in range(filler)]
             + [(piece, -5.0 if len(piece) > 2 else -10.0) for piece in real])
    tok = Tokenizer(models.Unigram(vocab, unk_id=ROBERTA_SPECIALS.index("<unk>"), byte_fallback=False))
    _unigram_pipeline(tok)
    roberta_layout(tok, XLMRobertaTokenizerFast).save_pretrained(str(folder))
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["type"] == "Unigram"
    return folder


def bpe_tokenizer(folder: Path, lines: list[str], vocab_size: int = 300) -> Path:
    train_byte_level_bpe(lambda: [lines], vocab_size).save_pretrained(str(folder))
    return folder
