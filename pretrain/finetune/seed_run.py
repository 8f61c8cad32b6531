"""One seed of `distil finetune`: transformers' Trainer on the train split, dev metrics per epoch (EpochLog),
test predictions in GLUE's submission layout, all under the seed's MLflow child run."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distil.pretrain.finetune.data import Split
from distil.pretrain.finetune.metrics import compute_metrics, predictions_from_logits
from distil.pretrain.finetune.tasks import TaskSpec
from distil.pretrain.finetune.track import EpochLog, FinetuneTracking

if TYPE_CHECKING:
    from distil.pretrain.finetune.run import FinetuneConfig, Prepared


def training_arguments(cfg: FinetuneConfig, device: torch.device, output_dir: Path, seed: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type="linear",
        seed=seed, data_seed=seed, eval_strategy="epoch" if cfg.eval_every_epoch else "no",
        logging_strategy="epoch", save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
        fp16=cfg.precision == "fp16", bf16=cfg.precision == "bf16", dataloader_num_workers=0,
        disable_tqdm=not sys.stderr.isatty(), log_level="error",
        # the features hold only the model's own inputs, plus the task teacher's logits with --distill-from, which
        # Trainer would otherwise drop before the loss sees them (they are not an argument of the model's forward)
        remove_unused_columns=False)


TASK_FILE = "distil_task.json"  # beside each saved model: its task, labels, windows, run (distil export reads it)


def write_task_file(folder: Path, cfg: FinetuneConfig, task: TaskSpec, seed: int, run_id: str | None,
                    dev: dict[str, float]) -> None:
    """distil_task.json beside a saved model: what it was fine-tuned on, so `distil export` can read the dev
    file, score the model and link its run without being told again."""
    import json

    info = {"task": task.name, "labels": list(task.labels) if task.labels is not None else None,
            "has_pair": task.pair is not None, "max_seq_len": cfg.max_seq_len, "seed": seed,
            "model": str(Path(cfg.model).resolve()), "mlflow_run_id": run_id, "dev": dev,  # type: ignore[arg-type]
            "distilled_from": str(Path(cfg.distill_from).resolve()) if cfg.distill_from else None,
            "truncation": cfg.truncation_for(task), "head_tokens": cfg.head_tokens}
    if task.name in ("squad", "squad_v2"):  # the windows and answer search its dev scores used
        info.update({k: getattr(cfg, k) for k in ("doc_stride", "max_query_len", "max_answer_len", "n_best",
                                                  "null_threshold")})
    (folder / TASK_FILE).write_text(json.dumps(info, indent=2) + "\n")


def write_predictions(path: Path, task: TaskSpec, split: Split, predictions) -> None:
    """GLUE's submission layout: `index<TAB>prediction`, label strings (or the score for regression)."""
    lines = ["index\tprediction"]
    for index, value in zip(split.index, predictions, strict=True):
        lines.append(f"{index}\t{float(value):.6g}" if task.is_regression else f"{index}\t{task.labels[int(value)]}")  # type: ignore[index]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_seed(cfg: FinetuneConfig, prep: Prepared, seed: int, model, features: dict, folder: Path,
             tracking: FinetuneTracking, run_name: str, params: dict[str, Any],
             tags: dict[str, str]) -> tuple[dict[str, Any], torch.nn.Module]:
    """One fine-tuning with transformers' Trainer; returns the seed's report entry and the trained model."""
    from transformers import DataCollatorWithPadding, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    task = prep.task
    evals = {k: features[k] for k in ("dev", "dev_mm") if k in features}

    def metrics_of(prediction) -> dict[str, float]:
        return compute_metrics(task, predictions_from_logits(task, prediction.predictions), prediction.label_ids)

    child = tracking.start_seed(f"{run_name}-seed{seed}", seed, params, tags)
    log = EpochLog(child, seed)
    status = "FAILED"
    try:
        trainer_class = Trainer
        if prep.task_teacher is not None:
            from distil.pretrain.finetune.distill import distilling_trainer

            trainer_class = distilling_trainer(task, cfg.alpha_kd, cfg.alpha_task, cfg.temperature)
        trainer = trainer_class(model=model, args=training_arguments(cfg, prep.device, folder / "trainer", seed),
                                data_collator=DataCollatorWithPadding(prep.tokenizer),
                                train_dataset=features["train"], eval_dataset=evals, compute_metrics=metrics_of,
                                callbacks=[log])
        trainer.remove_callback(PrinterCallback)  # EpochLog prints one line per epoch instead of raw dicts
        if not sys.stderr.isatty():
            trainer.remove_callback(ProgressCallback)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        if not cfg.eval_every_epoch:
            for key, dataset in evals.items():
                trainer.evaluate(dataset, metric_key_prefix=f"eval_{key}")
        entry: dict[str, Any] = {"seed": seed, "dev": log.final(), "history": log.history,
                                 "train_seconds": train_seconds, "test": None, "mlflow_run_id": child.run_id}
        for key in ("test", "test_mm"):
            if key in features:
                output = trainer.predict(features[key])
                predictions = predictions_from_logits(task, output.predictions)
                write_predictions(folder / f"{key.replace('_mm', '_mismatched')}_predictions.tsv", task,
                                  prep.splits[key], predictions)
                if prep.labels.get(key) is not None:
                    metrics = compute_metrics(task, predictions, prep.labels[key])
                    entry["test"] = {**(entry["test"] or {}),
                                     **{f"{key}_{k}": v for k, v in metrics.items()}}
        if entry["test"]:
            child.log_metrics(entry["test"], step=cfg.epochs)
        if cfg.save_models:
            trainer.save_model(str(folder / "model"))
            prep.tokenizer.save_pretrained(str(folder / "model"))
            write_task_file(folder / "model", cfg, task, seed, child.run_id, entry["dev"])
        status = "FINISHED"
    finally:
        child.finish(status)
        shutil.rmtree(folder / "trainer", ignore_errors=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # nothing kept for this seed (no test file, no saved model)
    return entry, trainer.model
