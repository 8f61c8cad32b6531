"""What `distil export` is given: a model folder (a fine-tuned sequence classifier / regressor written by `distil
finetune save_models=true`, or a pretrained masked LM such as a run's export/) and the dev set its forms are
checked and timed on, as tokenised, padded numpy batches with what scoring needs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distil.common.errors import UserError
from distil.pretrain.families import FAMILIES, NAMES
from distil.pretrain.finetune.seed_run import (
    TASK_FILE,  # written beside a fine-tuned model; command.py imports it here
)

KINDS = {"ForSequenceClassification": "sequence-classification", "ForMaskedLM": "masked-lm",
         "ForQuestionAnswering": "question-answering", "ForTokenClassification": "token-classification"}
MASK_FRACTION = 0.15  # masked-LM dev score: top-1 accuracy on this share of the tokens, fixed positions
IGNORE = -100


@dataclass
class Source:
    path: Path
    kind: str
    family: str
    model: torch.nn.Module
    tokenizer: Any
    task: Any  # a finetune TaskSpec for sequence classification / regression, None for a masked LM
    run_id: str | None  # the MLflow run that made the model, when known
    weight_files: list[Path] = field(default_factory=list)
    task_info: dict | None = None  # distil_task.json beside a fine-tuned model


@dataclass
class DevSet:
    path: str
    examples: int
    singles: list[dict[str, np.ndarray]]  # one example per batch, unpadded (latency at batch 1)
    batches: list[dict[str, np.ndarray]]  # padded batches (outputs, scores and throughput)
    labels: list[Any]  # per batch: class ids / values (classification, regression) or [B, L] ids (masked LM,
    # tagging); question answering: none (its `scoring` holds the questions and windows)
    scoring: Any = None


def _kind_of(config: dict, path: str) -> str:
    architectures = config.get("architectures") or []
    for arch in architectures:
        for suffix, kind in KINDS.items():
            if arch.endswith(suffix):
                return kind
    heads = ", ".join(architectures) or "no architectures in config.json"
    raise UserError(f"--model {path} has no head distil export takes ({heads}): give a masked LM (a training run's "
                    "export/) or a model fine-tuned by distil finetune with save_models=true (sentence classifier or "
                    "regressor, question answering, token tagging)")


def read_task_file(folder: Path) -> dict | None:
    file = folder / TASK_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as error:
        raise UserError(f"{file} is not valid JSON ({error}): restore it from the fine-tuning output") from None


def task_spec(task_info: dict | None, task_name: str | None, path: str):
    """The task a classifier was fine-tuned on: --task (a GLUE name), else the distil_task.json beside it."""
    from distil.pretrain.finetune.tasks import custom_task, glue_task

    if task_name and task_name.lower() != "custom":
        return glue_task(task_name)
    if task_info is None:
        raise UserError(f"--model {path} is a sequence classifier without {TASK_FILE}: give --task NAME (the GLUE "
                        "task it was fine-tuned on), or export a folder distil finetune saved (save_models=true)")
    if task_info.get("task") != "custom":
        return glue_task(task_info["task"])
    labels = task_info.get("labels")
    return custom_task(tuple(labels) if labels is not None else None, bool(task_info.get("has_pair")))


def load_source(path: str, task_name: str | None) -> Source:
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from distil.pretrain.finetune.model import load_tokenizer
    from distil.pretrain.models import quiet_transformers

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"--model {path}: no config.json there; give a model folder saved with save_pretrained")
    config = json.loads((folder / "config.json").read_text())
    family = config.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"--model {path} is a {family!r} model: distil export takes the families {NAMES}")
    found = _kind_of(config, path)
    if found == "masked-lm" and task_name:
        raise UserError(f"--model {path} is a masked LM: --task is for fine-tuned classifiers; leave it out")
    task_info = read_task_file(folder)
    if found in ("question-answering", "token-classification") and (task_info is None or task_name):
        raise UserError(f"--model {path}: a {found} model is exported with the {TASK_FILE} distil finetune saved beside "
                        "it (save_models=true), which says its task; " + ("leave --task out" if task_info else
                                                                          "export such a folder"))
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

    loader = {"sequence-classification": AutoModelForSequenceClassification, "masked-lm": AutoModelForMaskedLM,
              "question-answering": AutoModelForQuestionAnswering,
              "token-classification": AutoModelForTokenClassification}[found]
    try:
        with quiet_transformers():
            model, info = loader.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"--model {path} cannot be loaded: {first}") from None
    missing = info.get("missing_keys") or []
    if missing:
        raise UserError(f"--model {path}: weights missing from the folder (e.g. {sorted(missing)[0]}, {len(missing)} "
                        "in all): give a complete trained model")
    task = task_spec(task_info, task_name, path) if found == "sequence-classification" else None
    if found in ("question-answering", "token-classification"):
        from distil.pretrain.finetune.tasks import TaskSpec

        labels = task_info.get("labels")  # type: ignore[union-attr]
        task = TaskSpec(task_info["task"], tuple(labels) if labels else None, ("score",), text="", pair=None,  # type: ignore[index]
                        label="")
    if found == "sequence-classification" and model.config.num_labels != task.num_labels:
        raise UserError(f"--model {path} has {model.config.num_labels} outputs but task {task.name} has "
                        f"{task.num_labels}: give the --task it was fine-tuned on")
    model.eval()
    run_id = (task_info or {}).get("mlflow_run_id")
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return Source(folder, found, family, model, load_tokenizer(str(folder)), task, run_id, weights, task_info)


def _batches(tokenizer, encodings: list[dict[str, list[int]]], batch_size: int) -> list[dict[str, np.ndarray]]:
    out = []
    for start in range(0, len(encodings), batch_size):
        padded = tokenizer.pad(encodings[start : start + batch_size], return_tensors="np")
        out.append({k: np.asarray(v, dtype=np.int64) for k, v in padded.items()})
    return out


def dev_set(source: Source, dev: str, max_seq_len: int, batch_size: int, max_examples: int | None) -> DevSet:
    """The dev file tokenised (truncated to max_seq_len) into single-example and padded batches."""
    from distil.pretrain.finetune.data import encode_labels, read_split
    from distil.pretrain.finetune.model import encode, forward_names

    accepted = forward_names(source.model) & {"input_ids", "attention_mask", "token_type_ids"}
    tok = source.tokenizer
    if source.kind == "question-answering":
        from distil.pretrain.finetune.qa import make_features, qa_window_settings, read_squad

        examples = read_squad(dev, kind="dev", version=source.task.name)
        examples = examples if max_examples is None else examples[:max_examples]
        stride, query = qa_window_settings(source.task_info or {}, max_seq_len)
        windows = make_features(tok, examples, max_seq_len, stride, query, accepted, labelled=False)
        encodings = [{k: windows.encodings[k][i] for k in windows.encodings} for i in range(len(windows))]
        return DevSet(dev, len(windows), _batches(tok, encodings, 1), _batches(tok, encodings, batch_size), [],
                      (examples, windows))
    if source.kind == "token-classification":
        from distil.pretrain.finetune.tagging import align, check_tags, read_conll

        sentences = read_conll(dev, kind="dev")
        sentences = sentences if max_examples is None else sentences[:max_examples]
        check_tags(sentences, source.task.labels, dev)
        raw, _, _ = align(tok, sentences, source.task.labels, max_seq_len, accepted)
        targets = raw.pop("labels")
        encodings = [{k: raw[k][i] for k in raw} for i in range(len(sentences))]
        label_batches = []
        for start in range(0, len(sentences), batch_size):
            chunk = targets[start : start + batch_size]
            width = max(len(t) for t in chunk)
            label_batches.append(np.asarray([t + [IGNORE] * (width - len(t)) for t in chunk]))
        return DevSet(dev, len(sentences), _batches(tok, encodings, 1), _batches(tok, encodings, batch_size),
                      label_batches)
    if source.kind == "sequence-classification":
        glue = None if source.task.name == "custom" else source.task
        split = read_split(glue, dev, kind="dev")
        if split.labels is None:
            raise UserError(f"--dev {dev} has no labels: give the task's labelled dev file")
        labels = encode_labels(source.task, split)
        n = len(split) if max_examples is None else min(len(split), max_examples)
        pairs = split.pairs[:n] if split.pairs is not None else None
        info = source.task_info or {}  # the fine-tuning's window of each text (IMDb: head + tail)
        raw = encode(tok, split.texts[:n], pairs, max_seq_len, info.get("truncation", "head"), info.get("head_tokens"))
        encodings = [{k: raw[k][i] for k in raw if k in accepted} for i in range(n)]
        label_batches = [np.asarray(labels[s : s + batch_size]) for s in range(0, n, batch_size)]
    else:
        file = Path(dev)
        if not file.is_file():
            raise UserError(f"--dev {dev}: no such file (a masked LM is checked on a text file, one text per line)")
        lines = [line.strip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines()]
        lines = [line for line in lines if line]
        n = len(lines) if max_examples is None else min(len(lines), max_examples)
        if n == 0:
            raise UserError(f"--dev {dev} has no text: give a text file with one example per line")
        raw = tok(lines[:n], truncation=True, max_length=max_seq_len)
        rng = np.random.default_rng(0)
        special = set(tok.all_special_ids)
        encodings, targets = [], []
        for i in range(n):
            ids = list(raw["input_ids"][i])
            words = [j for j, t in enumerate(ids) if t not in special]
            chosen = rng.choice(words, size=max(1, round(MASK_FRACTION * len(words))), replace=False) if words else []
            target = [IGNORE] * len(ids)
            for j in chosen:
                target[j], ids[j] = ids[j], tok.mask_token_id
            encodings.append({"input_ids": ids, **{k: raw[k][i] for k in raw if k in accepted and k != "input_ids"}})
            targets.append(target)
        label_batches = []
        for start in range(0, n, batch_size):
            chunk = targets[start : start + batch_size]
            width = max(len(t) for t in chunk)
            if tok.padding_side == "left":
                label_batches.append(np.asarray([[IGNORE] * (width - len(t)) + t for t in chunk]))
            else:
                label_batches.append(np.asarray([t + [IGNORE] * (width - len(t)) for t in chunk]))
    singles = _batches(tok, encodings, 1)
    return DevSet(dev, n, singles, _batches(tok, encodings, batch_size), label_batches)


def score(source: Source, logits: list[np.ndarray], dev: DevSet) -> dict[str, float]:
    """The task's dev metrics (GLUE's, `score` their mean) or, for a masked LM, top-1 accuracy on the masked
    tokens (`score`)."""
    if source.kind == "question-answering":
        from distil.pretrain.finetune.qa import predict_answers, squad_scores

        examples, windows = dev.scoring
        rows = [row for batch in logits for row in batch]  # per window: (tokens, 2), start and end
        info = source.task_info or {}
        answers = predict_answers(examples, windows, [r[:, 0] for r in rows], [r[:, 1] for r in rows],
                                  info.get("n_best", 20), info.get("max_answer_len", 30), source.task.name,
                                  info.get("null_threshold", 0.0))
        scores = squad_scores(examples, answers, source.task.name)
        return {**scores, "score": (scores["exact"] + scores["f1"]) / 2}
    if source.kind == "token-classification":
        from distil.pretrain.finetune.tagging import decode, tag_scores

        gold, predicted = [], []
        for out, target in zip(logits, dev.labels, strict=True):
            g, p = decode(out, target, source.task.labels)
            gold += g
            predicted += p
        scores = tag_scores(gold, predicted)
        return {**scores, "score": scores["f1"]}
    if source.kind == "sequence-classification":
        from distil.pretrain.finetune.metrics import compute_metrics, predictions_from_logits

        predictions = predictions_from_logits(source.task, np.concatenate(logits))
        return compute_metrics(source.task, predictions, np.concatenate(dev.labels))
    hits = total = 0
    for out, target in zip(logits, dev.labels, strict=True):
        keep = target != IGNORE
        hits += int((out.argmax(-1)[keep] == target[keep]).sum())
        total += int(keep.sum())
    return {"top1_accuracy": hits / total, "score": hits / total}
