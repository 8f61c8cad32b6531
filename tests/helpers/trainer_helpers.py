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
