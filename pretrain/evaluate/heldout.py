"""Scoring masked-LM models on held-out batches: every batch goes through every model before the next is read.

Per model: masked-LM loss (mean cross-entropy over the masked positions), perplexity (exp of it), top-1 /
top-5 accuracy on the masked positions, parameter count and measured inference throughput (non-padding
tokens per second of forward time, the first batch left out as warm-up when there are more); with a teacher:
KL(teacher || student) at temperature 1 averaged over the masked positions, and top-1 agreement with it.
Nothing is kept in memory across batches: the teacher's distribution of the current batch is at hand for
the students' KL without storing logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distil.common.errors import UserError

METRIC_NAMES = ("mlm_loss", "perplexity", "top1_accuracy", "top5_accuracy", "tokens_per_s", "kl_from_teacher",
                "teacher_agreement")


@dataclass
class ModelResult:
    """What the report holds for one model."""

    name: str
    path: str
    role: str  # "teacher" or "student"
    model_type: str
    num_parameters: int
    mlm_loss: float
    perplexity: float
    top1_accuracy: float
    top5_accuracy: float
    masked_tokens: int
    tokens: int
    forward_seconds: float
    tokens_per_s: float | None
    kl_from_teacher: float | None = None
    teacher_agreement: float | None = None


class Tally:
    """Running sums over the masked positions of one model."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.top1 = 0
        self.top5 = 0
        self.masked = 0
        self.kl_sum = 0.0
        self.agree = 0
        self.tokens = 0
        self.timed_tokens = 0
        self.timed_seconds = 0.0
        self.seconds = 0.0


def masked_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], positions: torch.Tensor,
                  device: torch.device) -> tuple[torch.Tensor, float]:
    """fp32 logits at the masked positions [M, V] and the forward time in seconds (device synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return logits[positions].float(), seconds


def score(tally: Tally, logits: torch.Tensor, targets: torch.Tensor, teacher_log_probs: torch.Tensor | None,
          teacher_top1: torch.Tensor | None) -> None:
    tally.loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    tally.top1 += (top5[:, 0] == targets).sum().item()
    tally.top5 += (top5 == targets[:, None]).any(dim=-1).sum().item()
    tally.masked += targets.numel()
    if teacher_log_probs is not None:
        log_probs = F.log_softmax(logits, dim=-1)
        tally.kl_sum += F.kl_div(log_probs, teacher_log_probs, reduction="sum", log_target=True).item()
        tally.agree += (top5[:, 0] == teacher_top1).sum().item()


def run_evaluation(models: list[tuple[str, str, torch.nn.Module]], stream, device: torch.device,
                   max_batches: int | None, teacher_name: str | None,
                   progress: Callable[[], None] | None = None) -> tuple[list[ModelResult], dict[str, int]]:
    """models: (name, path, model); the teacher, if any, first. Every batch goes through every model."""
    tallies = {name: Tally() for name, _, _ in models}
    counts = {"batches": 0, "sequences": 0, "tokens": 0, "masked_tokens": 0}
    with torch.inference_mode():
        for index, cpu_batch in enumerate(stream):
            if max_batches is not None and index >= max_batches:
                break
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            positions = batch["labels"] != -100
            targets = batch["labels"][positions]
            tokens = int(cpu_batch["attention_mask"].sum())
            counts["batches"] += 1
            counts["sequences"] += int(cpu_batch["input_ids"].shape[0])
            counts["tokens"] += tokens
            counts["masked_tokens"] += int(targets.numel())
            teacher_log_probs = teacher_top1 = None
            for name, _, model in models:
                logits, seconds = masked_logits(model, batch, positions, device)
                tally = tallies[name]
                tally.tokens += tokens
                tally.seconds += seconds
                if index > 0:  # the first batch is warm-up (allocator, kernels) when more follow
                    tally.timed_tokens += tokens
                    tally.timed_seconds += seconds
                if name == teacher_name:
                    score(tally, logits, targets, None, None)
                    teacher_log_probs = F.log_softmax(logits, dim=-1)
                    teacher_top1 = logits.argmax(dim=-1)
                else:
                    score(tally, logits, targets, teacher_log_probs, teacher_top1)
            if progress is not None:
                progress()
    if counts["batches"] == 0:
        raise UserError("the held-out split gave no batches: re-run distil prepare with a larger --holdout-fraction")
    if counts["masked_tokens"] == 0:
        raise UserError("no masked tokens in the evaluated batches: raise --max-batches or --batch-size")
    return [result(name, path, model, tallies[name], teacher_name) for name, path, model in models], counts


def result(name: str, path: str, model: torch.nn.Module, t: Tally, teacher_name: str | None) -> ModelResult:
    loss = t.loss_sum / t.masked
    seconds, tokens = (t.timed_seconds, t.timed_tokens) if t.timed_tokens else (t.seconds, t.tokens)
    is_student = teacher_name is not None and name != teacher_name
    return ModelResult(
        name=name, path=str(path), role="teacher" if name == teacher_name else "student",
        model_type=model.config.model_type, num_parameters=int(model.num_parameters()), mlm_loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf, top1_accuracy=t.top1 / t.masked,
        top5_accuracy=t.top5 / t.masked, masked_tokens=t.masked, tokens=t.tokens, forward_seconds=t.seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else None,
        kl_from_teacher=t.kl_sum / t.masked if is_student else None,
        teacher_agreement=t.agree / t.masked if is_student else None)


def eval_metrics(r: ModelResult) -> dict[str, float]:
    """The model's MLflow metrics: eval_<name>, so `distil review` shows them as columns."""
    values = {name: getattr(r, name) for name in METRIC_NAMES}
    return {f"eval_{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
