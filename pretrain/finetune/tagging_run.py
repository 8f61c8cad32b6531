"""`distil finetune --task conll`: token tagging (named entities) from CoNLL files, with the same seeds, report,
MLflow runs, saved models and `--distill-from` step as the other tasks, on tagging.py's alignment and scores.

OUTPUT/report.json        metrics f1 (the score), precision, recall (seqeval, entity level) and word accuracy
OUTPUT/predictions.txt    the median seed's dev tags, CoNLL style: `word gold predicted`, a blank line between
                          sentences (words cut by max_seq_len are not there)
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
import torch

from distil.common.errors import UserError
from distil.pretrain.finetune.distill import teacher_autocast
from distil.pretrain.finetune.runner import (
    RunRecord,
    announce,
    distillation_record,
    run_seeds,
    timed_inference,
    train_seed,
)
from distil.pretrain.finetune.tagging import (
    Sentence,
    align,
    check_tags,
    decode,
    label_set,
    read_conll,
    tag_distillation_loss,
    tag_scores,
)
from distil.pretrain.finetune.tasks import TaskSpec
from distil.pretrain.finetune.track import FinetuneTracking

if TYPE_CHECKING:
    from distil.pretrain.finetune.run import FinetuneConfig


def tagging_task(labels: tuple[str, ...]) -> TaskSpec:
    return TaskSpec("conll", labels, ("f1",), text="words", pair=None, label="tags",
                    extra_metrics=("precision", "recall", "accuracy"))


def word_tokenizer(path: str):
    """The folder's tokenizer, able to take words (byte-level BPE ones need add_prefix_space for that)."""
    from transformers import AutoTokenizer

    from distil.pretrain.finetune.model import load_tokenizer, quiet

    tokenizer = load_tokenizer(path)
    if getattr(tokenizer, "add_prefix_space", None) is False:
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(path, add_prefix_space=True)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{path}: token tagging needs a fast tokenizer (word ids); save the model's tokenizer.json "
                        "beside it")
    return tokenizer


def load_tagger(path: str, what: str, labels: tuple[str, ...], seed: int | None = None):
    from transformers import AutoModelForTokenClassification, set_seed

    from distil.pretrain.finetune.model import quiet

    kwargs: dict[str, Any] = {}
    if seed is not None:
        set_seed(seed)
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {t: i for i, t in enumerate(labels)}, "ignore_mismatched_sizes": True}
    try:
        with quiet():
            model, info = AutoModelForTokenClassification.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"{what} {path} cannot be loaded for token tagging: {first}") from None
    allowed = ("classifier",) if seed is not None else ()
    missing = [k for k in info.get("missing_keys") or [] if not any(part in k.split(".") for part in allowed)]
    if missing:
        raise UserError(f"{what} {path}: weights are missing from the folder (e.g. {sorted(missing)[0]}, "
                        f"{len(missing)} in all): give a trained {'encoder' if seed is not None else 'tagger'}")
    return model


class Tagged(torch.utils.data.Dataset):
    def __init__(self, encodings: dict[str, list], teacher: list | None = None) -> None:
        self.encodings, self.teacher = encodings, teacher

    def __len__(self) -> int:
        return len(self.encodings["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        if self.teacher is not None:
            item["teacher_logits"], item["teacher_mask"] = self.teacher[i]
        return item


def collator(tokenizer, num_labels: int):
    """transformers' token-classification padding (labels with -100), plus the teacher's per-token logits."""
    from transformers import DataCollatorForTokenClassification

    pad = DataCollatorForTokenClassification(tokenizer)

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        teacher = [(it.pop("teacher_logits"), it.pop("teacher_mask")) for it in items] if "teacher_logits" in items[0] \
            else None
        batch = dict(pad(items))
        if teacher is not None:
            width = batch["input_ids"].shape[1]
            logits = torch.zeros(len(items), width, num_labels)
            mask = torch.zeros(len(items), width, dtype=torch.long)
            for row, (values, kept) in enumerate(teacher):
                logits[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
                mask[row, :len(kept)] = torch.tensor(kept)
            batch["teacher_logits"], batch["teacher_mask"] = logits, mask
        return batch

    return collate


@torch.inference_mode()
def teacher_word_logits(model, tokenizer, sentences: list[Sentence], labels: tuple[str, ...], max_seq_len: int,
                        device: torch.device, precision: str, batch_size: int) -> list[list[list[float]]]:
    """The teacher's logits at each word's first sub-word (its own tokenizer), per sentence, for the words its
    window keeps: word-level, so teacher and student need not share a tokenizer."""
    from distil.pretrain.finetune.model import forward_names

    model.eval().to(device)
    encodings, firsts, _ = align(tokenizer, sentences, labels, max_seq_len, forward_names(model))
    encodings.pop("labels")
    collate = collator(tokenizer, len(labels))
    out: list[list[list[float]]] = []
    for lo in range(0, len(sentences), batch_size):
        rows = range(lo, min(len(sentences), lo + batch_size))
        batch = collate([{k: encodings[k][i] for k in encodings} for i in rows])
        with teacher_autocast(device, precision):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        for j, i in enumerate(rows):
            out.append(logits[j, firsts[i]].tolist())
    model.to("cpu")
    return out


def place_teacher(per_word: list[list[list[float]]], firsts: list[list[int]], lengths: list[int],
                  num_labels: int) -> list[tuple[list[list[float]], list[int]]]:
    """Per student window: the teacher's logits at the student's first sub-word of each word, and a mask."""
    placed = []
    for words, positions, length in zip(per_word, firsts, lengths, strict=True):
        logits = [[0.0] * num_labels for _ in range(length)]
        mask = [0] * length
        for word, position in enumerate(positions):
            if word < len(words):
                logits[position], mask[position] = words[word], 1
        placed.append((logits, mask))
    return placed


def tagging_finetune_run(cfg: FinetuneConfig) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from distil.pretrain.finetune.model import (
        Features,
        check_tokenizer_fits,
        count_parameters,
        forward_names,
        inspect_model_folder,
    )
    from distil.pretrain.finetune.run import QA_SETTINGS, check_output, resolve_device

    tracking = FinetuneTracking(cfg.tracking, cfg.tracking_uri, cfg.experiment)
    tracking.check()
    for key in ("test", "test_mismatched", "dev_mismatched"):
        if getattr(cfg, key):
            raise UserError(f"--{key.replace('_', '-')} is not for token tagging: CoNLL is scored on --dev")
    device = resolve_device(cfg)
    out = check_output(cfg)
    info = inspect_model_folder(cfg.model)  # type: ignore[arg-type]
    tokenizer = word_tokenizer(cfg.model)  # type: ignore[arg-type]
    check_tokenizer_fits(info, tokenizer, cfg.max_seq_len)
    train = read_conll(cfg.train, kind="train")  # type: ignore[arg-type]
    dev = read_conll(cfg.dev, kind="dev")  # type: ignore[arg-type]
    labels = label_set(train)
    check_tags(dev, labels, cfg.dev)  # type: ignore[arg-type]
    task = tagging_task(labels)
    teacher = teacher_model = None
    if cfg.distill_from:
        from distil.pretrain.finetune.distill import check_task_teacher

        teacher = check_task_teacher(cfg.distill_from, task, cfg.model)  # type: ignore[arg-type]
        teacher_model = load_tagger(teacher.path, "--distill-from", labels)
    first_model = load_tagger(cfg.model, "--model", labels, cfg.seed_list[0])  # type: ignore[arg-type]
    accepted = forward_names(first_model)
    encoded = {"train": align(tokenizer, train, labels, cfg.max_seq_len, accepted),
               "dev": align(tokenizer, dev, labels, cfg.max_seq_len, accepted)}
    record = RunRecord(cfg, task.name, info.model_type, count_parameters(first_model),
                       teacher.run_id if teacher else None, teacher.path if teacher else None,
                       skip=("problem", "truncation", "head_tokens", *QA_SETTINGS))
    distillation, teacher_rows = None, None
    if teacher is not None:
        started = time.perf_counter()
        per_word = teacher_word_logits(teacher_model, word_tokenizer(teacher.path), train, labels, cfg.max_seq_len,
                                       device, cfg.precision, cfg.eval_batch_size)
        train_encodings, train_firsts, _ = encoded["train"]
        teacher_rows = place_teacher(per_word, train_firsts, [len(x) for x in train_encodings["input_ids"]],
                                     len(labels))
        distillation = distillation_record(teacher, cfg, device, time.perf_counter() - started)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    report = record.finish_report(
        problem="token-tagging", labels=list(labels), metrics=["f1"], settings=record.settings, device=str(device),
        distillation=distillation,
        data={k: {"path": str(Path(p).resolve()), "sentences": len(s), "words": sum(len(x.words) for x in s),
                  "words_cut": encoded[k][2]}
              for k, p, s in (("train", cfg.train, train), ("dev", cfg.dev, dev))})
    for key in ("train", "dev"):
        if encoded[key][2]:
            click.echo(f"{key}: {encoded[key][2]} words beyond max_seq_len {cfg.max_seq_len} are cut (not trained on "
                       "or scored); raise --max-seq-len to keep them", err=True)
    announce(record, cfg, info.model_type, f"conll: {len(train)} train / {len(dev)} dev sentences, tags "
             f"{', '.join(labels)}", device)
    datasets = {"train": Tagged(encoded["train"][0], teacher_rows), "dev": Tagged(encoded["dev"][0])}

    def one_seed(seed: int, model, folder: Path):
        return tagging_seed(cfg, task, tokenizer, device, seed, model, datasets, dev, encoded["dev"][1], folder,
                            tracking, record)

    def after(folder: Path, chosen: int, last) -> None:
        shutil.copyfile(folder / f"seed_{chosen}" / "predictions.txt", folder / "predictions.txt")
        if cfg.inference and last is not None:
            timed = Features({k: v for k, v in encoded["dev"][0].items() if k != "labels"}, None)
            report["inference"] = {"unit": "sentences", **timed_inference(cfg, device, last, timed,
                                                                          collator(tokenizer, len(labels)))}

    return run_seeds(cfg, tracking, out, record, first_model,
                     lambda seed: load_tagger(cfg.model, "--model", labels, seed),  # type: ignore[arg-type]
                     one_seed, after)


def tagging_seed(cfg: FinetuneConfig, task: TaskSpec, tokenizer, device: torch.device, seed: int, model,
                 datasets: dict[str, Tagged], dev: list[Sentence], dev_firsts: list[list[int]], folder: Path,
                 tracking: FinetuneTracking, record: RunRecord):
    from transformers import Trainer

    labels = task.labels
    assert labels is not None

    def metrics_of(prediction) -> dict[str, float]:
        gold, predicted = decode(np.asarray(prediction.predictions), np.asarray(prediction.label_ids), labels)
        scores = tag_scores(gold, predicted)
        return {**scores, "score": scores["f1"]}

    class TagTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher, mask = inputs.pop("teacher_logits", None), inputs.pop("teacher_mask", None)
            if teacher is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            gold = inputs.pop("labels")
            outputs = model(**inputs)
            loss, _, _ = tag_distillation_loss(outputs.logits, teacher, mask, gold, cfg.alpha_kd, cfg.alpha_task,
                                               cfg.temperature)
            return (loss, outputs) if return_outputs else loss

    def write_outputs(output, folder: Path) -> None:
        gold, predicted = decode(np.asarray(output.predictions), np.asarray(output.label_ids), labels)
        lines = []
        for sentence, g, p in zip(dev, gold, predicted, strict=True):
            lines += [f"{w} {a} {b}" for w, a, b in zip(sentence.words, g, p, strict=False)] + [""]
        (folder / "predictions.txt").write_text("\n".join(lines), encoding="utf-8")

    return train_seed(cfg, device, seed, model, tokenizer, task, TagTrainer, collator(tokenizer, len(labels)),
                      datasets["train"], datasets["dev"], metrics_of, folder, tracking, record, write_outputs)
