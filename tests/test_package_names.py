"""Our top-level `kernels` package shares its name with HF's `kernels` package on PyPI.

transformers imports HF `kernels` opportunistically (hub kernels); with ours installed in its place, building
and running BERT / DistilBERT must still work. README states the two cannot be installed side by side.
"""

import importlib
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM


def test_kernels_resolves_to_this_repository():
    mod = importlib.import_module("kernels")
    repo_root = Path(__file__).resolve().parents[1]
    assert Path(mod.__file__).resolve().parent == repo_root / "kernels"


def test_transformers_builds_and_runs_bert_and_distilbert_with_our_kernels_installed():
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                                     hidden_dim=32, max_position_embeddings=32))
    ids = torch.randint(5, 50, (2, 8))
    mask = torch.ones_like(ids)
    assert bert(input_ids=ids, attention_mask=mask).logits.shape == (2, 8, 50)
    assert student(input_ids=ids, attention_mask=mask).logits.shape == (2, 8, 50)
