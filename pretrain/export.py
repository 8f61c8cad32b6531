"""The trained model in Hugging Face format: save_pretrained (safetensors) + tokenizer files beside it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from distil.common.errors import UserError
from distil.common.files import atomic_write_folder
from distil.data_pipeline.manifest import Manifest, is_remote


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


def check_tokenizer_source(source: str | None) -> None:
    """Called before training so a missing tokenizer fails at start, not after the last step."""
    if source is None:
        raise UserError("no tokenizer to export beside the model: prepare the shards with `distil prepare` "
                        "(it saves tokenizer/) or set run.export=false")
    try:
        AutoTokenizer.from_pretrained(source)
    except Exception as e:  # damaged files raise anything from the tokenizers library
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer from {source} for export: {first}; "
                        "set run.export=false to train without exporting") from None


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
