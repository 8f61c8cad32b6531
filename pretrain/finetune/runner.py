"""What every kind of `distil finetune` run shares (sentence tasks in run.py, question answering in qa_run.py,
token tagging in tagging_run.py): the settings and MLflow params, the distillation record, and the seed loop
that fills the output folder atomically, picks the median seed and closes the parent run."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch

from distil.common.files import atomic_write_folder, atomic_write_json
from distil.pretrain.finetune.metrics import median_metrics, median_seed
from distil.pretrain.finetune.track import EpochLog, FinetuneTracking

if TYPE_CHECKING:
    from distil.pretrain.finetune.run import FinetuneConfig

# not settings of the run (paths, names, tracking): params of their own or none
NOT_SETTINGS = ("model", "task", "train", "dev", "dev_mismatched", "test", "test_mismatched", "output", "name",
                "teacher", "overwrite", "tracking", "tracking_uri", "experiment", "distill_from")
DISTILL_SETTINGS = ("alpha_kd", "alpha_task", "temperature")


class RunRecord:
    """The run's name, settings, MLflow params / tags and the report skeleton, built once from the config."""

    def __init__(self, cfg: FinetuneConfig, task_name: str, model_type: str, num_parameters: int,
                 teacher_run_id: str | None, distill_from: str | None, skip: tuple[str, ...] = ()) -> None:
        from distil.pretrain.finetune.run import model_label

        self.name = cfg.name or model_label(cfg.model) + (" (D)" if cfg.distill_from else "")  # type: ignore[arg-type]
        self.model_path = str(Path(cfg.model).resolve())  # type: ignore[arg-type]
        teacher_path = str(Path(cfg.teacher).resolve()) if cfg.teacher else ""
        self.settings = {k: v for k, v in asdict(cfg).items()
                         if k not in (*NOT_SETTINGS, *skip) and (cfg.distill_from or k not in DISTILL_SETTINGS)}
        self.params = {"finetune.model": self.model_path, "finetune.name": self.name, "finetune.task": task_name,
                       "finetune.teacher": teacher_path, "finetune.model_type": model_type,
                       **({"finetune.distill_from": distill_from} if distill_from else {}),
                       **{f"finetune.{k}": v for k, v in self.settings.items() if v is not None}}
        self.num_parameters = num_parameters
        self.tags = {"distil.num_parameters": str(num_parameters), "distil.finetune.task": task_name}
        if teacher_run_id:
            self.tags["distil.finetune.teacher_run_id"] = teacher_run_id  # the teacher's own fine-tuning run
        self.run_name = f"finetune-{self.name}-{task_name}"
        self.report: dict[str, Any] = {
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "model": self.model_path, "name": self.name,
            "model_type": model_type, "teacher": teacher_path or None, "task": task_name}

    def finish_report(self, **fields: Any) -> dict[str, Any]:
        self.report.update(fields)
        self.report.update({"num_parameters": self.num_parameters, "seeds": [], "median": {}, "median_seed": None,
                            "inference": None})
        return self.report


def distillation_record(teacher, cfg: FinetuneConfig, device: torch.device, seconds: float) -> dict[str, Any]:
    """report.json's `distillation`: which teacher, its dev scores and run, the loss settings, how it ran."""
    return {"teacher": teacher.path, "teacher_model_type": teacher.model_type, "teacher_run_id": teacher.run_id,
            "teacher_dev": teacher.dev, "alpha_kd": cfg.alpha_kd, "alpha_task": cfg.alpha_task,
            "temperature": cfg.temperature,
            "teacher_precision": ("bf16" if cfg.precision == "bf16" else "fp16") if device.type == "cuda" else "fp32",
            "teacher_seconds": seconds}


def timed_inference(cfg: FinetuneConfig, device: torch.device, model, features, collator) -> dict[str, Any]:
    """A full dev pass (Table 3) with `inference_threads` threads on CPU, the caller's thread count restored."""
    from distil.pretrain.finetune.model import time_inference

    batch = cfg.inference_batch_size or (1 if device.type == "cpu" else cfg.eval_batch_size)
    model = model.float() if cfg.precision != "fp32" else model
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.inference_threads:
        torch.set_num_threads(cfg.inference_threads)
    try:
        return {"split": "dev", **time_inference(model, features, collator, device, batch, cfg.inference_max_examples)}
    finally:
        torch.set_num_threads(threads)


def run_seeds(cfg: FinetuneConfig, tracking: FinetuneTracking, out: Path, record: RunRecord, first_model,
              load_model: Callable[[int], Any], one_seed: Callable[[int, Any, Path], tuple[dict, Any]],
              after: Callable[[Path, int, Any], None], extra_medians: Callable[[], dict[str, float]] = dict) -> dict:
    """Every seed (`one_seed(seed, model, folder)` -> report entry and trained model), the medians and median
    seed, then `after(folder, median_seed, last_model)`; the folder appears only when all of it succeeded, and
    the parent run ends FINISHED or FAILED accordingly."""
    from distil.pretrain.finetune.run import print_summary

    report = record.report

    def fill(folder: Path) -> None:
        tracking.start_parent(record.run_name, record.params, record.tags)
        report["mlflow"] = {"experiment": cfg.experiment, "parent_run_id": tracking.parent_run_id} if cfg.tracking \
            else None
        model, last = first_model, None
        for i, seed in enumerate(cfg.seed_list):
            if i > 0:
                model = load_model(seed)
            entry, last = one_seed(seed, model, folder / f"seed_{seed}")
            report["seeds"].append(entry)
        report["median"] = median_metrics([s["dev"] for s in report["seeds"]])
        chosen = median_seed([s["seed"] for s in report["seeds"]], [s["dev"]["dev_score"] for s in report["seeds"]])
        report["median_seed"] = chosen
        after(folder, chosen, last)
        atomic_write_json(folder / "report.json", report)

    status = "FAILED"
    try:
        atomic_write_folder(out, fill)
        status = "FINISHED"
    finally:
        medians = dict(report["median"])
        inference = report.get("inference")
        if inference:
            medians.update({"inference_seconds": inference["seconds"], "inference_examples": inference["examples"],
                            "inference_batch_size": inference["batch_size"]})
            tracking.parent.set_tags({"distil.finetune.inference_device": inference["device_name"],
                                      "distil.finetune.torch_threads": str(inference["torch_threads"])})
        medians["num_parameters"] = record.num_parameters
        medians.update(extra_medians())
        tracking.finish_parent(medians, out / "report.json" if status == "FINISHED" else None, status)
    print_summary(report)
    return report


def announce(record: RunRecord, cfg: FinetuneConfig, model_type: str, what: str, device: torch.device) -> None:
    click.echo(f"fine-tuning {record.name} ({model_type}, {record.num_parameters:,} parameters) on {what}, seeds "
               f"{cfg.seed_list}, {cfg.epochs} epoch(s), lr {cfg.lr:g}, batch {cfg.batch_size}, {device}")


def train_seed(cfg: FinetuneConfig, device: torch.device, seed: int, model, tokenizer, task, trainer_class,
               collate, train_set, dev_set, metrics_of, folder: Path, tracking: FinetuneTracking, record: RunRecord,
               write_outputs: Callable[[Any, Path], None]) -> tuple[dict[str, Any], Any]:
    """One seed of a QA or tagging run: `trainer_class` (transformers' Trainer with the task's loss) on the train
    set, dev metrics per epoch under the seed's MLflow child run, `write_outputs(dev prediction, folder)`, the
    saved model with its distil_task.json; returns the seed's report entry and the trained model."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from distil.pretrain.finetune.seed_run import training_arguments, write_task_file

    child = tracking.start_seed(f"{record.run_name}-seed{seed}", seed, record.params, record.tags)
    log = EpochLog(child, seed)
    status = "FAILED"
    try:
        trainer = trainer_class(model=model, args=training_arguments(cfg, device, folder / "trainer", seed),
                                data_collator=collate, train_dataset=train_set, eval_dataset={"dev": dev_set},
                                compute_metrics=metrics_of, callbacks=[log])
        trainer.remove_callback(PrinterCallback)  # EpochLog prints one line per epoch instead
        if not sys.stderr.isatty():
            trainer.remove_callback(ProgressCallback)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        output = trainer.predict(dev_set, metric_key_prefix="eval_dev")
        if not cfg.eval_every_epoch:
            log.on_evaluate(trainer.args, trainer.state, trainer.control, metrics=output.metrics)
        folder.mkdir(parents=True, exist_ok=True)
        write_outputs(output, folder)
        entry: dict[str, Any] = {"seed": seed, "dev": log.final(), "history": log.history,
                                 "train_seconds": train_seconds, "test": None, "mlflow_run_id": child.run_id}
        if cfg.save_models:
            trainer.save_model(str(folder / "model"))
            tokenizer.save_pretrained(str(folder / "model"))
            write_task_file(folder / "model", cfg, task, seed, child.run_id, entry["dev"])
        status = "FINISHED"
    finally:
        child.finish(status)
        shutil.rmtree(folder / "trainer", ignore_errors=True)
    return entry, trainer.model
