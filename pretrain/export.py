"""The trained model in Hugging Face format: save_pretrained (safetensors) + tokenizer files beside it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from distil.common.errors import UserError
from distil.common.files import atomic_write_folder
from distil.data_pipeline.manifest import Manifest, is_remote
from distil.data_pipeline.prepare.tokenize import tokenizer_fails, tokenizer_sha256


def tokenizer_source(manifest: Manifest, shards_base: str, teacher_path: str | None) -> str | None:
    """Where the tokenizer files come from: the shards' saved tokenizer, else the teacher's folder/name."""
    if manifest.tokenizer_dir and not is_remote(shards_base):
        local = Path(shards_base) / manifest.tokenizer_dir
        if local.is_dir():
            return str(local)
    if teacher_path is not None:
        return teacher_path
    name = manifest.tokenizer_name
    if name and Path(name).is_dir():
        return name
    return None


def shards_tokenizer_sha256(manifest: Manifest, shards_base: str, source: str | None) -> str | None:
    """The tokenizer hash the shards were made with, when `source` is the shard set's own tokenizer folder."""
    if source is None or not manifest.tokenizer_dir or is_remote(shards_base):
        return None
    return manifest.tokenizer_sha256 if Path(source) == Path(shards_base) / manifest.tokenizer_dir else None


def check_tokenizer_source(source: str | None, expected_sha256: str | None = None) -> None:
    """Called before training so a missing or damaged tokenizer fails at start, not after the last step.
    `expected_sha256`: the manifest's hash of the tokenizer that made the shards, for the shard set's own
    folder (a damaged tokenizer.json can still load, and would then ship with the model tokenising otherwise)."""
    if source is None:
        raise UserError("no tokenizer to export beside the model: prepare the shards with `distil prepare` "
                        "(it saves tokenizer/) or set run.export=false")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # damaged files raise anything from the tokenizers library
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer from {source} for export: {first}; "
                        "set run.export=false to train without exporting") from None
    why = tokenizer_fails(tokenizer)
    if why is not None:
        raise UserError(f"the tokenizer in {source} loads but cannot tokenise text ({why}); restore its files, "
                        "or set run.export=false to train without exporting")
    if expected_sha256 is not None and tokenizer_sha256(tokenizer) != expected_sha256:
        raise UserError(f"the tokenizer in {source} is not the one the shards were made with (its sha256 differs "
                        "from manifest.json's tokenizer_sha256): restore that folder from the shard set, or set "
                        "run.export=false to train without exporting")


def export_model(model: PreTrainedModel, out_dir: Path, tokenizer_from: str) -> Path:
    """Writes an fp32 copy of `model` + tokenizer to out_dir (via a temporary folder, renamed at the end)."""
    # A fresh model loaded from the weights: the engine's module carries hooks and may be half precision.
    clone = type(model)(copy.deepcopy(model.config))
    clone.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()})
    clone.eval()

    def fill(folder: Path) -> None:
        clone.save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)

    return atomic_write_folder(out_dir, fill)
