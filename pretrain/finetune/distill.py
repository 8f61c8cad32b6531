"""Distillation during fine-tuning (the paper's second step, "DistilBERT (D)" in its Table 2): a teacher already
fine-tuned on the task teaches the model being fine-tuned.

The teacher is a model folder saved by `distil finetune save_models=true` (`OUTPUT/seed_<n>/model`): its
`distil_task.json` says which task and labels it was trained on, and a teacher for another task or another
label set is refused before any work. The teacher runs once, in inference mode, over the train split with its
own tokenizer (fp16 on a GPU, bf16 with precision=bf16, fp32 on CPU); its logits are kept beside each example.
Fine-tuning carries no data augmentation, so one pass gives exactly the logits a per-batch forward would, at a
fraction of the cost. The training loss of each batch is then

    classification:  alpha_kd * KL(softmax(t / T) || softmax(s / T)) * T^2  +  alpha_task * CE(s, y)
    regression:      alpha_kd * MSE(s, t)                                     +  alpha_task * MSE(s, y)

with s the model's logits, t the teacher's, y the labels, the KL averaged over examples (Hinton et al.'s T^2
keeps the soft term's gradient scale independent of T). Evaluation and the reported dev metrics are the task's
own, unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distil.common.errors import UserError
from distil.pretrain.finetune.tasks import TaskSpec


def teacher_autocast(device: torch.device, precision: str):
    """The task teacher's forward: fp16 autocast on a GPU (bf16 with precision=bf16), plain fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                          enabled=device.type == "cuda")


@dataclass(frozen=True)
class TaskTeacher:
    """A checked fine-tuned teacher: its folder, what distil_task.json says about it, its model type."""

    path: str
    info: dict[str, Any]
    model_type: str

    @property
    def run_id(self) -> str | None:
        return self.info.get("mlflow_run_id")

    @property
    def dev(self) -> dict[str, float]:
        return dict(self.info.get("dev") or {})


def task_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, regression: bool,
                           alpha_kd: float, alpha_task: float, temperature: float) -> tuple[torch.Tensor, ...]:
    """(total, soft term, task term) for one batch, computed in fp32 whatever the logits' dtype."""
    s, t = student.float(), teacher.float()
    if regression:
        s = s.reshape(-1)
        soft = F.mse_loss(s, t.reshape(-1))
        task = F.mse_loss(s, labels.float().reshape(-1))
    else:
        soft = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                        reduction="batchmean", log_target=True) * temperature**2
        task = F.cross_entropy(s, labels.long())
    return alpha_kd * soft + alpha_task * task, soft, task


def check_task_teacher(path: str, task: TaskSpec, model_path: str) -> TaskTeacher:
    """The folder given as --distill-from, or a UserError naming what to change."""
    from distil.pretrain.finetune.model import inspect_model_folder
    from distil.pretrain.finetune.seed_run import TASK_FILE

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--distill-from {path}: no such folder (give a teacher saved by distil finetune "
                        "save_models=true: its OUTPUT/seed_<n>/model)")
    if folder.resolve() == Path(model_path).resolve():
        raise UserError(f"--distill-from {path} is the model being fine-tuned: give a teacher fine-tuned on the task")
    task_file = folder / TASK_FILE
    if not task_file.is_file():
        raise UserError(f"--distill-from {path} has no {TASK_FILE}: give a model saved by distil finetune "
                        "save_models=true for this task (its OUTPUT/seed_<n>/model), not a pretrained encoder")
    try:
        info = json.loads(task_file.read_text())
        taught, labels = info["task"], info["labels"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--distill-from {path}: {TASK_FILE} is unreadable ({error}); save the teacher again") from None
    if taught != task.name:
        raise UserError(f"--distill-from {path} was fine-tuned on {taught}, not {task.name}: give a teacher "
                        f"fine-tuned on {task.name}")
    mine = list(task.labels) if task.labels is not None else None
    if labels != mine:
        described = "regression" if labels is None else ", ".join(map(str, labels))
        wanted = "regression" if mine is None else ", ".join(mine)
        raise UserError(f"--distill-from {path} predicts labels ({described}) but this task has ({wanted}): give a "
                        "teacher fine-tuned on the same label set")
    if bool(info.get("has_pair")) != (task.pair is not None):
        raise UserError(f"--distill-from {path} was fine-tuned on {'pairs' if info.get('has_pair') else 'single texts'}"
                        f" but this {task.name} data has {'pairs' if task.pair is not None else 'single texts'}: "
                        "give a teacher fine-tuned on the same inputs")
    model_info = inspect_model_folder(str(folder))
    return TaskTeacher(str(folder.resolve()), info, model_info.model_type)


def load_task_teacher(teacher: TaskTeacher, task: TaskSpec, max_seq_len: int):
    """The teacher's model (its own head, unchanged) and tokenizer, checked against max_seq_len."""
    from transformers import AutoModelForSequenceClassification

    from distil.pretrain.finetune.model import (
        check_tokenizer_fits,
        inspect_model_folder,
        load_tokenizer,
        quiet,
    )

    tokenizer = load_tokenizer(teacher.path)
    info = inspect_model_folder(teacher.path)
    try:
        check_tokenizer_fits(info, tokenizer, max_seq_len)
    except UserError as error:
        raise UserError(f"--distill-from: {error}") from None
    try:
        with quiet():
            model, loading = AutoModelForSequenceClassification.from_pretrained(teacher.path, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"--distill-from {teacher.path} cannot be loaded as a {task.name} model: {first}") from None
    if loading.get("missing_keys"):
        raise UserError(f"--distill-from {teacher.path}: weights are missing ({sorted(loading['missing_keys'])[0]}, "
                        f"{len(loading['missing_keys'])} in all): give a model saved by distil finetune")
    if model.config.num_labels != task.num_labels:
        raise UserError(f"--distill-from {teacher.path} has {model.config.num_labels} outputs, {task.name} needs "
                        f"{task.num_labels}: give a teacher fine-tuned on {task.name}")
    return model, tokenizer


@torch.inference_mode()
def teacher_logits(model, tokenizer, texts: list[str], pairs: list[str] | None, max_seq_len: int,
                   device: torch.device, precision: str, batch_size: int, truncation: str = "head",
                   head_tokens: int | None = None) -> list[list[float]]:
    """The teacher's logits for every example, in order (one list of floats each), on the same window of each
    text as the student sees (the same truncation)."""
    from transformers import DataCollatorWithPadding

    from distil.pretrain.finetune.model import encode, forward_names

    model.eval().to(device)
    names = forward_names(model)
    encodings = encode(tokenizer, texts, pairs, max_seq_len, truncation, head_tokens)
    keys = [k for k in encodings if k in names]
    collator = DataCollatorWithPadding(tokenizer)
    out: list[list[float]] = []
    for start in range(0, len(texts), batch_size):
        batch = collator([{k: encodings[k][i] for k in keys} for i in range(start, min(len(texts), start + batch_size))])
        with teacher_autocast(device, precision):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        out.extend(logits.float().cpu().tolist())
    model.to("cpu")
    return out


def distilling_trainer(task: TaskSpec, alpha_kd: float, alpha_task: float, temperature: float):
    """transformers' Trainer whose training loss is task_distillation_loss on batches that carry the teacher's
    logits (the train split); batches without them (dev, test) get the model's own task loss."""
    from transformers import Trainer

    class DistillingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher = inputs.pop("teacher_logits", None)
            if teacher is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss, _, _ = task_distillation_loss(outputs.logits, teacher, labels, task.is_regression, alpha_kd,
                                                alpha_task, temperature)
            return (loss, outputs) if return_outputs else loss

    return DistillingTrainer
