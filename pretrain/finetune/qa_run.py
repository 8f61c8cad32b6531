"""`distil finetune --task squad | squad_v2`: extractive question answering with the same seeds, report, MLflow
runs, saved models and `--distill-from` step as the sentence tasks (run.py), on qa.py's windows and scores.

OUTPUT/report.json          as for the sentence tasks; metrics exact and f1 (and v2.0's HasAns / NoAns split)
OUTPUT/predictions.json     the median seed's dev answers in the official layout: {question id: answer text}
OUTPUT/seed_<n>/            each seed's predictions.json (and model/, with save_models=true)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from distil.common.errors import UserError
from distil.pretrain.finetune.distill import teacher_autocast
from distil.pretrain.finetune.qa import (
    QAExample,
    QAFeatures,
    make_features,
    predict_answers,
    read_squad,
    squad_scores,
)
from distil.pretrain.finetune.runner import (
    RunRecord,
    announce,
    distillation_record,
    run_seeds,
    timed_inference,
    train_seed,
)
from distil.pretrain.finetune.tasks import TaskSpec
from distil.pretrain.finetune.track import FinetuneTracking

if TYPE_CHECKING:
    from distil.pretrain.finetune.run import FinetuneConfig

NEG = -1e4  # the logit given to padded positions before a softmax: exp() of it is 0 in fp32


def qa_task(version: str) -> TaskSpec:
    return TaskSpec(version, None, ("exact", "f1"), text="question", pair="context", label="answers")


class WindowSet(torch.utils.data.Dataset):
    def __init__(self, features: QAFeatures) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.features.encodings.items()}
        if self.features.teacher is not None:
            item["teacher_start"] = self.features.teacher["start"][i]
            item["teacher_end"] = self.features.teacher["end"][i]
        return item


def collator(tokenizer):
    """Pads windows (the tokenizer's own padding) and the teacher's per-token logits (with NEG)."""

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        teacher = None
        if "teacher_start" in items[0]:
            teacher = [(it.pop("teacher_start"), it.pop("teacher_end")) for it in items]
        batch = dict(tokenizer.pad(items, return_tensors="pt"))
        if teacher is not None:
            width = batch["input_ids"].shape[1]
            for key, part in (("teacher_start", 0), ("teacher_end", 1)):
                rows = [list(t[part]) + [NEG] * (width - len(t[part])) for t in teacher]
                batch[key] = torch.tensor(rows, dtype=torch.float32)
        return batch

    return collate


def span_distillation_loss(start: torch.Tensor, end: torch.Tensor, teacher_start: torch.Tensor,
                           teacher_end: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor,
                           mask: torch.Tensor, alpha_kd: float, alpha_task: float,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, soft, task): the soft term is the mean over start and end of KL(teacher || student at T) x T^2
    over the window's tokens (padding left out), the task term the span cross-entropy (BERT's: the mean of the
    start and end CE), both in fp32."""
    soft = start.new_zeros((), dtype=torch.float32)
    task = start.new_zeros((), dtype=torch.float32)
    keep = mask.bool()
    for s, t, gold in ((start, teacher_start, start_positions), (end, teacher_end, end_positions)):
        s = s.float().masked_fill(~keep, NEG)
        t = t.float().masked_fill(~keep, NEG)
        soft = soft + F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                               reduction="batchmean", log_target=True) * temperature**2 / 2
        task = task + F.cross_entropy(s, gold.long()) / 2
    return alpha_kd * soft + alpha_task * task, soft, task


def load_qa_model(path: str, what: str, seed: int | None = None):
    from transformers import AutoModelForQuestionAnswering, set_seed

    from distil.pretrain.finetune.model import quiet

    if seed is not None:
        set_seed(seed)
    try:
        with quiet():
            model, info = AutoModelForQuestionAnswering.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"{what} {path} cannot be loaded for question answering: {first}") from None
    allowed = ("qa_outputs", "classifier") if seed is not None else ()  # ModernBERT names its span head classifier
    missing = [k for k in info.get("missing_keys") or [] if not any(part in k.split(".") for part in allowed)]
    if missing:
        raise UserError(f"{what} {path}: weights are missing from the folder (e.g. {sorted(missing)[0]}, "
                        f"{len(missing)} in all): give a trained {'encoder' if seed is not None else 'QA model'}")
    return model


def check_qa_settings(cfg: FinetuneConfig) -> None:
    for key in ("test", "test_mismatched", "dev_mismatched"):
        if getattr(cfg, key):
            raise UserError(f"--{key.replace('_', '-')} is not for question answering: SQuAD is scored on --dev")
    checks = [("doc_stride", 0 < cfg.doc_stride < cfg.max_seq_len, f"in (0, max_seq_len = {cfg.max_seq_len})"),
              ("max_query_len", 0 < cfg.max_query_len < cfg.max_seq_len - 2, "in (0, max_seq_len - 2)"),
              ("max_answer_len", cfg.max_answer_len >= 1, ">= 1"), ("n_best", cfg.n_best >= 1, ">= 1")]
    for key, ok, rule in checks:
        if not ok:
            raise UserError(f"{key}={getattr(cfg, key)} must be {rule}")
    room = cfg.max_seq_len - cfg.max_query_len - 4  # what a window keeps for the context beside the longest question
    if cfg.doc_stride >= room:
        raise UserError(f"doc_stride={cfg.doc_stride} must be below max_seq_len - max_query_len - 4 = {room} (the "
                        "context's share of a window, specials included): lower doc_stride or max_query_len, or raise "
                        "--max-seq-len")


def qa_finetune_run(cfg: FinetuneConfig, version: str) -> dict[str, Any]:
    """Validate, fine-tune every seed, write the output folder and the MLflow runs (run.finetune_run's shape)."""
    from transformers.utils import logging as hf_logging

    from distil.pretrain.finetune.model import (
        Features,
        check_tokenizer_fits,
        count_parameters,
        forward_names,
        inspect_model_folder,
        load_tokenizer,
    )
    from distil.pretrain.finetune.run import check_output, resolve_device

    tracking = FinetuneTracking(cfg.tracking, cfg.tracking_uri, cfg.experiment)
    tracking.check()
    check_qa_settings(cfg)
    device = resolve_device(cfg)
    out = check_output(cfg)
    info = inspect_model_folder(cfg.model)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(cfg.model)  # type: ignore[arg-type]
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"--model {cfg.model}: question answering needs a fast tokenizer (character offsets); save "
                        "the model's tokenizer.json beside it")
    check_tokenizer_fits(info, tokenizer, cfg.max_seq_len)
    task = qa_task(version)
    train = read_squad(cfg.train, kind="train", version=version)  # type: ignore[arg-type]
    dev = read_squad(cfg.dev, kind="dev", version=version)  # type: ignore[arg-type]
    teacher = teacher_model = None
    if cfg.distill_from:
        from distil.pretrain.finetune.distill import check_task_teacher

        teacher = check_task_teacher(cfg.distill_from, task, cfg.model)  # type: ignore[arg-type]
        teacher_model = load_qa_model(teacher.path, "--distill-from")
    first_model = load_qa_model(cfg.model, "--model", cfg.seed_list[0])  # type: ignore[arg-type]
    accepted = forward_names(first_model)
    windows = {"train": make_features(tokenizer, train, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len, accepted,
                                      labelled=True),
               "dev": make_features(tokenizer, dev, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len, accepted,
                                    labelled=True)}
    record = RunRecord(cfg, version, info.model_type, count_parameters(first_model), teacher.run_id if teacher else None,
                       teacher.path if teacher else None, skip=("problem", "truncation", "head_tokens"))
    distillation = None
    if teacher is not None:
        started = time.perf_counter()
        teacher_tokenizer = load_tokenizer(teacher.path)
        theirs = make_features(teacher_tokenizer, train, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len,
                               forward_names(teacher_model), labelled=False)
        mine = windows["train"].encodings["input_ids"]
        if len(theirs) != len(mine) or not all(np.array_equal(a, b) for a, b in zip(theirs.encodings["input_ids"], mine,
                                                                                    strict=True)):
            raise UserError(f"--distill-from {teacher.path}: its tokenizer cuts the questions and contexts into other "
                            "tokens than the model's: span distillation needs the same tokenizer (give a teacher "
                            "fine-tuned from the same vocabulary)")
        windows["train"].teacher = teacher_span_logits(teacher_model, teacher_tokenizer, theirs, device, cfg.precision,
                                                       cfg.eval_batch_size)
        distillation = distillation_record(teacher, cfg, device, time.perf_counter() - started)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    report = record.finish_report(
        problem="question-answering", labels=None, metrics=list(task.metrics), settings=record.settings,
        device=str(device), distillation=distillation,
        data={k: {"path": str(Path(p).resolve()), "examples": len(ex), "windows": len(windows[k]),
                  "unanswerable": sum(not e.answers for e in ex)}
              for k, p, ex in (("train", cfg.train, train), ("dev", cfg.dev, dev))})
    announce(record, cfg, info.model_type, f"{version}: {len(train)} train questions ({len(windows['train'])} "
             f"windows) / {len(dev)} dev", device)

    def one_seed(seed: int, model, folder: Path):
        return qa_seed(cfg, version, task, tokenizer, device, seed, model, windows, dev, folder, tracking, record)

    def after(folder: Path, chosen: int, last) -> None:
        shutil.copyfile(folder / f"seed_{chosen}" / "predictions.json", folder / "predictions.json")
        if cfg.inference and last is not None:
            keys = [k for k in windows["dev"].encodings if k not in ("start_positions", "end_positions")]
            timed = Features({k: windows["dev"].encodings[k] for k in keys}, None)
            report["inference"] = {"unit": "windows", **timed_inference(cfg, device, last, timed, collator(tokenizer))}

    return run_seeds(cfg, tracking, out, record, first_model,
                     lambda seed: load_qa_model(cfg.model, "--model", seed),  # type: ignore[arg-type]
                     one_seed, after)


@torch.inference_mode()
def teacher_span_logits(model, tokenizer, features: QAFeatures, device: torch.device, precision: str,
                        batch_size: int) -> dict[str, list]:
    """The teacher's start and end logits of every window (unpadded lists), in inference mode: fp16 (bf16 with
    precision=bf16) autocast on a GPU, fp32 on CPU."""
    model.eval().to(device)
    collate = collator(tokenizer)
    starts: list[list[float]] = []
    ends: list[list[float]] = []
    n = len(features)
    for lo in range(0, n, batch_size):
        rows = range(lo, min(n, lo + batch_size))
        batch = collate([{k: features.encodings[k][i] for k in features.encodings} for i in rows])
        with teacher_autocast(device, precision):
            out = model(**{k: v.to(device) for k, v in batch.items()})
        for j, i in enumerate(rows):
            width = len(features.encodings["input_ids"][i])
            starts.append(out.start_logits[j, :width].float().cpu().tolist())
            ends.append(out.end_logits[j, :width].float().cpu().tolist())
    model.to("cpu")
    return {"start": starts, "end": ends}


def qa_seed(cfg: FinetuneConfig, version: str, task: TaskSpec, tokenizer, device: torch.device, seed: int, model,
            windows: dict[str, QAFeatures], dev: list[QAExample], folder: Path, tracking: FinetuneTracking,
            record: RunRecord):
    """One seed: Trainer on the train windows, dev answers and scores per epoch, predictions.json."""
    from transformers import Trainer

    def answers_of(start_logits: np.ndarray, end_logits: np.ndarray) -> dict[str, str]:
        return predict_answers(dev, windows["dev"], start_logits, end_logits, cfg.n_best, cfg.max_answer_len, version,
                               cfg.null_threshold)

    def metrics_of(prediction) -> dict[str, float]:
        start_logits, end_logits = prediction.predictions[:2]
        scores = squad_scores(dev, answers_of(start_logits, end_logits), version)
        return {**scores, "score": (scores["exact"] + scores["f1"]) / 2}

    class SpanTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher_start, teacher_end = inputs.pop("teacher_start", None), inputs.pop("teacher_end", None)
            if teacher_start is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            starts, ends = inputs.pop("start_positions"), inputs.pop("end_positions")
            outputs = model(**inputs)
            loss, _, _ = span_distillation_loss(outputs.start_logits, outputs.end_logits, teacher_start, teacher_end,
                                                starts, ends, inputs["attention_mask"], cfg.alpha_kd, cfg.alpha_task,
                                                cfg.temperature)
            return (loss, outputs) if return_outputs else loss

    def write_outputs(output, folder: Path) -> None:
        start_logits, end_logits = output.predictions[:2]
        (folder / "predictions.json").write_text(json.dumps(answers_of(start_logits, end_logits), indent=1,
                                                            ensure_ascii=False) + "\n", encoding="utf-8")

    return train_seed(cfg, device, seed, model, tokenizer, task, SpanTrainer, collator(tokenizer),
                      WindowSet(windows["train"]), WindowSet(windows["dev"]), metrics_of, folder, tracking, record,
                      write_outputs)
