"""Tiny models and manifests for the trainer tests (built in-process, nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

from distil.data_pipeline.manifest import Manifest, ShardInfo, SpecialTokens

VOCAB = 120


def tiny_bert(vocab: int = VOCAB, layers: int = 4, hidden: int = 32, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0)
    model = BertForMaskedLM(cfg)
    # Make every tensor distinct (e.g. LayerNorms start at 1/0 everywhere) so mapping tests can fail.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_manifest(vocab: int = VOCAB, max_len: int = 64) -> Manifest:
    return Manifest(shards=[ShardInfo("train-000000.tar", 1, 10)], holdout_shards=[], vocab_size=vocab,
                    special_tokens=SpecialTokens(pad=0, cls=2, sep=3, mask=4, unk=1), max_len=max_len,
                    dtype="uint16", tokenizer_name="test", tokenizer_sha256="0")


# Special ids as each family's own tokenizers lay them out (BERT: [PAD] 0; RoBERTa/XLM-R: <s> 0, <pad> 1, </s> 2).
FAMILY_SPECIALS = {
    "bert": SpecialTokens(pad=0, cls=2, sep=3, mask=4, unk=1),
    "distilbert": SpecialTokens(pad=0, cls=2, sep=3, mask=4, unk=1),
    "roberta": SpecialTokens(pad=1, cls=0, sep=2, mask=VOCAB - 1, unk=3),
    "xlm-roberta": SpecialTokens(pad=1, cls=0, sep=2, mask=VOCAB - 1, unk=3),
    "modernbert": SpecialTokens(pad=0, cls=2, sep=3, mask=4, unk=1),
}


def tiny_teacher(family: str, vocab: int = VOCAB, layers: int = 4, hidden: int = 32, seed: int = 0,
                 max_len: int = 64) -> torch.nn.Module:
    """A tiny random masked LM of `family`, every tensor distinct, dropout off, in eval mode."""
    import transformers

    sp = FAMILY_SPECIALS[family]
    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                 intermediate_size=2 * hidden)
    if family == "bert":
        return tiny_bert(vocab, layers, hidden, seed)
    if family == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=4,
                                               hidden_dim=2 * hidden, max_position_embeddings=max_len,
                                               pad_token_id=sp.pad, dropout=0.0, attention_dropout=0.0)
    elif family in ("roberta", "xlm-roberta"):
        cls = transformers.RobertaConfig if family == "roberta" else transformers.XLMRobertaConfig
        config = cls(**sizes, max_position_embeddings=max_len + sp.pad + 1, type_vocab_size=1, pad_token_id=sp.pad,
                     bos_token_id=sp.cls, eos_token_id=sp.sep, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    else:
        config = transformers.ModernBertConfig(**sizes, max_position_embeddings=max_len, pad_token_id=sp.pad,
                                               bos_token_id=sp.cls, eos_token_id=sp.sep, cls_token_id=sp.cls,
                                               sep_token_id=sp.sep, global_attn_every_n_layers=2,
                                               local_attention=8)
    from distil.pretrain.families import FAMILIES

    model = FAMILIES[family].model_class()(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def family_manifest(family: str, vocab: int = VOCAB, max_len: int = 64) -> Manifest:
    return Manifest(shards=[ShardInfo("train-000000.tar", 1, 10)], holdout_shards=[], vocab_size=vocab,
                    special_tokens=FAMILY_SPECIALS[family], max_len=max_len, dtype="uint16",
                    tokenizer_name="test", tokenizer_sha256="0")
