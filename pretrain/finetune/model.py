"""The encoder with a fresh classification head, its tokenizer, the tokenised splits, and inference timing
measured the paper's way (Table 3: a full pass over a dev set at batch size 1 on CPU; batched on a GPU).

Any folder `AutoModelForSequenceClassification` loads from a BERT-family encoder will do: a distil export
(BertForMaskedLM teacher, DistilBertForMaskedLM student), a bare BertModel, a Hugging Face checkpoint saved
locally. Only the head (classifier, pooler, DistilBERT's pre_classifier) may be missing from the folder: a
folder whose encoder weights are missing is refused rather than fine-tuned from random weights.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distil.common.errors import UserError
from distil.pretrain.finetune.data import Split
from distil.pretrain.finetune.tasks import TaskSpec

ENCODER_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "camembert", "albert", "electra", "deberta",
                 "deberta-v2", "mobilebert", "megatron-bert", "ernie", "modernbert")
HEAD_PARTS = ("classifier", "pre_classifier", "pooler", "score")


@dataclass
class ModelInfo:
    path: str
    model_type: str
    vocab_size: int
    max_positions: int | None


def quiet():
    from distil.pretrain.models import quiet_transformers

    return quiet_transformers()


def inspect_model_folder(path: str) -> ModelInfo:
    """config.json of a BERT-family encoder, or a UserError saying what the folder is instead."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--model {path}: no such folder (give a model folder saved with save_pretrained, e.g. a "
                        "distil run's export/)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"--model {path} has no config.json: give a folder saved with save_pretrained")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"--model {path}: config.json is not readable JSON ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ENCODER_TYPES:
        raise UserError(f"--model {path} is a {model_type!r} model, not a BERT-family encoder (fine-tuning takes "
                        f"model_type {', '.join(ENCODER_TYPES[:4])}, ...)")
    return ModelInfo(str(folder), model_type, int(config.get("vocab_size") or 0),
                     config.get("max_position_embeddings"))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - transformers raises several types for a folder without one
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"--model {path}: no usable tokenizer beside the model ({first}); save the tokenizer in "
                        "the folder (distil's export does)") from None
    return tokenizer


def check_tokenizer_fits(info: ModelInfo, tokenizer, max_seq_len: int) -> None:
    if info.vocab_size and len(tokenizer) > info.vocab_size:
        raise UserError(f"--model {info.path}: its tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{info.vocab_size} embeddings: save the model's own tokenizer in the folder")
    if info.max_positions and max_seq_len > info.max_positions:
        raise UserError(f"--max-seq-len {max_seq_len} is above the model's {info.max_positions} positions: "
                        f"use at most {info.max_positions}")


def load_for_task(path: str, task: TaskSpec, seed: int) -> torch.nn.Module:
    """The encoder from `path` with a classification head drawn from `seed`; only head weights may be new."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    labels = task.labels or ("score",)
    kwargs: dict[str, Any] = {"num_labels": task.num_labels,
                              "problem_type": "regression" if task.is_regression else "single_label_classification"}
    if not task.is_regression:
        kwargs["id2label"] = {i: task.label_names.get(label, label) for i, label in enumerate(labels)}
        kwargs["label2id"] = {name: i for i, name in kwargs["id2label"].items()}
    try:
        with quiet():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)  # another task's head: new
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"--model {path} cannot be loaded as a sequence classifier: {first}") from None
    missing = [k for k in info.get("missing_keys") or [] if not any(part in k.split(".") for part in HEAD_PARTS)]
    if missing:
        raise UserError(f"--model {path}: the encoder's weights are missing from the folder (e.g. {sorted(missing)[0]}"
                        f", {len(missing)} in all): give a trained encoder, not a bare config")
    return model


def forward_names(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


class Features(torch.utils.data.Dataset):
    """Tokenised examples (unpadded; the collator pads each batch), with labels when the split has them."""

    def __init__(self, encodings: dict[str, list], labels: list | None) -> None:
        self.encodings = encodings
        self.labels = labels
        self.size = len(next(iter(encodings.values())))
        self.teacher_logits: list | None = None  # with --distill-from (train split): the task teacher's, per example

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        if self.teacher_logits is not None:
            item["teacher_logits"] = self.teacher_logits[i]
        return item


TRUNCATIONS = ("auto", "head", "head_tail")


def encode(tokenizer, texts: list[str], pairs: list[str] | None, max_seq_len: int, truncation: str = "head",
           head_tokens: int | None = None) -> dict[str, list]:
    """Token ids of each example, at most max_seq_len with the special tokens. "head" keeps a text's first
    tokens (pairs: longest first, as GLUE fine-tuning does); "head_tail" keeps the first `head_tokens` and fills
    the rest of the window from the text's end (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification":
    128 + 382 of 512 beat head-only on IMDb). head_tokens None: a quarter of the window."""
    if truncation != "head_tail" or pairs is not None:
        return dict(tokenizer(texts, pairs, truncation=True, max_length=max_seq_len))
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
    full = tokenizer(texts, return_special_tokens_mask=True)  # whole texts: the cut is made below
    for ids, special in zip(full["input_ids"], full["special_tokens_mask"], strict=True):
        words = [i for i, s in enumerate(special) if not s]  # the text's own tokens, between the specials
        body = max_seq_len - (len(ids) - len(words))
        if len(words) > body:
            head = body // 4 if head_tokens is None else min(head_tokens, body)
            kept = set(words[:head] + words[len(words) - (body - head):])
            ids = [t for i, t in enumerate(ids) if special[i] or i in kept]
        out["input_ids"].append(list(ids))
        out["attention_mask"].append([1] * len(ids))
        out["token_type_ids"].append([0] * len(ids))
    return out


def tokenize(tokenizer, split: Split, labels: list | None, max_seq_len: int, accepted: set[str],
             truncation: str = "head", head_tokens: int | None = None) -> Features:
    encodings = encode(tokenizer, split.texts, split.pairs, max_seq_len, truncation, head_tokens)
    kept = {k: v for k, v in encodings.items() if k in accepted}  # DistilBERT takes no token_type_ids
    return Features(kept, labels)


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


@torch.inference_mode()
def time_inference(model: torch.nn.Module, features: Features, collator, device: torch.device,
                   batch_size: int, max_examples: int | None = None) -> dict[str, Any]:
    """Seconds for one full pass over `features` (forward only, inputs tokenised beforehand), after one
    untimed warm-up batch; device synchronised on CUDA. Batch size 1 on CPU is the paper's Table 3 setting."""
    model.eval()
    model.to(device)
    n = len(features) if max_examples is None else min(len(features), max_examples)
    keys = [k for k in features.encodings]

    def batch(start: int) -> dict[str, torch.Tensor]:
        items = [{k: features.encodings[k][i] for k in keys} for i in range(start, min(n, start + batch_size))]
        return {k: v.to(device) for k, v in collator(items).items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    batches = [batch(start) for start in range(0, n, batch_size)]  # padded and on the device beforehand
    model(**batches[0])  # warm-up: allocator, kernels
    sync()
    started = time.perf_counter()
    for inputs in batches:
        model(**inputs)
    sync()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "examples": n, "examples_per_s": n / seconds if seconds > 0 else None,
            "batch_size": batch_size, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads()}
