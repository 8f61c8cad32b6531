"""Whether a model fits a shard set: vocabulary, special-token ids and positions.

One check for every command that puts a model on shards (`distil train` for teacher and student, `distil
evaluate` for each model): a mismatch would otherwise give garbage or an index error deep in a forward pass.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from distil.common.errors import UserError
from distil.data_pipeline.manifest import Manifest

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def tokenizer_special_ids(path: str | None) -> dict[str, int]:
    """Special token ids of the tokenizer saved in a model folder (or cached for a hub name); {} when there is
    none to read."""
    if path is None or (Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES)):
        return {}
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception:  # no tokenizer to read (not cached, offline, unreadable): nothing to compare
        return {}
    ids = {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id, "mask": tok.mask_token_id,
           "unk": tok.unk_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def check_manifest_ids(manifest: Manifest) -> None:
    over = {k: v for k, v in asdict(manifest.special_tokens).items() if v >= manifest.vocab_size}
    if over:
        raise UserError(f"shard manifest special token ids {over} are outside its vocab_size {manifest.vocab_size}")


def check_model_fits(label: str, config: Any, manifest: Manifest, *, tokenizer_path: str | None,
                     fix: str) -> None:
    """`label` names the model in the message ("teacher", a folder); `fix` says what to do about the shards."""
    if config.vocab_size != manifest.vocab_size:
        raise UserError(f"{label} vocab_size {config.vocab_size} != shards' vocab_size {manifest.vocab_size}: {fix}")
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and pad != manifest.special_tokens.pad:
        raise UserError(f"{label} pad_token_id {pad} != shards' pad id {manifest.special_tokens.pad}: the shards "
                        f"were tokenised with another tokenizer; {fix}")
    from distil.pretrain.families import usable_positions

    positions = usable_positions(config)
    if positions is not None and positions < manifest.max_len:
        raise UserError(f"{label} holds {positions} positions (max_position_embeddings "
                        f"{config.max_position_embeddings}) < shards' max_len {manifest.max_len}: re-run "
                        "distil prepare with a smaller --max-seq-len")
    shards_ids = asdict(manifest.special_tokens)
    diff = {k: (v, shards_ids[k]) for k, v in tokenizer_special_ids(tokenizer_path).items() if shards_ids.get(k) != v}
    if diff:
        raise UserError(f"{label} tokenizer special token ids differ from the shards' (model, shards): {diff}; {fix}")
