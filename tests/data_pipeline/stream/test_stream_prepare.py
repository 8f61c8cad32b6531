"""The loader reads what `distil prepare` writes: every sample once per epoch, masks from its token counts."""

import pytest
import torch
from prepare_helpers import build_tokenizer, make_documents, read_split, run_prepare

from distil.data_pipeline.masking import IGNORE_INDEX, MaskingConfig
from distil.data_pipeline.stream.loader import PretrainStream


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    tokenizer_dir = build_tokenizer(root / "tokenizer")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(line for doc in make_documents(300, seed=4) for line in doc) + "\n")
    out = root / "shards"
    result = run_prepare(
        ["--input", str(corpus), "--output", str(out), "--tokenizer", str(tokenizer_dir),
         "--max-seq-len", "48", "--workers", "1", "--holdout-fraction", "0.2"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def rows(batches) -> list[tuple[int, ...]]:
    out = []
    for b in batches:
        for ids, attention in zip(b["labels"], b["attention_mask"], strict=True):
            out.append(tuple(ids[attention.bool()].tolist()))
    return out


@pytest.mark.parametrize("split", ["train", "holdout"])
def test_two_ranks_read_every_prepared_sample(prepared, split):
    expected = sorted(tuple(ids.tolist()) for _, ids in read_split(prepared, holdout=split == "holdout"))
    seen = []
    for rank in range(2):
        stream = PretrainStream(
            str(prepared), split=split, rank=rank, world_size=2, batch_size=4, masking=None
        )
        seen += rows(stream)
    assert set(seen) == set(expected)
    assert len(seen) - len(expected) <= 1  # one repeat at most, to even out the two ranks


def test_masked_batches_from_prepared_shards(prepared):
    stream = PretrainStream(str(prepared), batch_size=8, masking=MaskingConfig())
    special = torch.tensor(stream.manifest.special_tokens.ids())
    for batch in stream:
        chosen = batch["labels"] != IGNORE_INDEX
        assert int(chosen.sum()) == -(-int(batch["attention_mask"].sum()) * 15 // 100)
        assert not torch.isin(batch["labels"][chosen], special).any()
