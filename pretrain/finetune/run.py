"""`distil finetune`: fine-tune an encoder on a GLUE task (or a labelled file of your own) with several seeds,
and report the median of the dev metrics, as the paper's Table 1.

Everything a user can get wrong is checked before any work (task, files, columns, labels, model folder,
tokenizer, settings, tracking URI): one `error:` line, exit status 2, nothing written. The output folder is
built beside its final place and renamed at the end, so it holds a finished report or nothing. Each seed is
one run of transformers' Trainer (seed_run.py); this module checks, loops over the seeds and reports.

OUTPUT/report.json            settings, data, per seed: dev metrics per epoch and final, test metrics when the
                              test file has labels; the medians; parameters and inference time (Table 3)
OUTPUT/test_predictions.tsv   with --test: GLUE's submission layout (index, prediction) from the median seed
OUTPUT/seed_<n>/              each seed's test predictions (and model/, with save_models=true)
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from distil.common.config import flag, load_command_config, only_overrides
from distil.common.errors import UserError
from distil.pretrain.finetune.data import Split, check_pairs, encode_labels, infer_custom_task, read_split
from distil.pretrain.finetune.seed_run import run_seed
from distil.pretrain.finetune.tasks import PROBLEMS, TaskSpec, glue_task, task_names
from distil.pretrain.finetune.track import FinetuneTracking

PRECISIONS = ("fp32", "fp16", "bf16")
QA_SETTINGS = ("doc_stride", "max_query_len", "max_answer_len", "n_best", "null_threshold")  # squad's own
DEVICES = ("auto", "cpu", "cuda")



@dataclass
class FinetuneConfig:
    """`distil finetune`'s settings: a YAML file (`--config`), its options and `key=value` overrides.
    Defaults are the common GLUE recipe (run_glue's, and the paper's protocol of 5 seeds)."""

    model: str | None = None  # an encoder folder (a distil export, a saved HF BERT / DistilBERT, ...)
    task: str | None = None  # cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli or custom
    train: str | None = None
    dev: str | None = None  # MNLI: the matched dev set
    dev_mismatched: str | None = None  # MNLI only
    test: str | None = None  # optional: predictions in GLUE's submission layout
    test_mismatched: str | None = None  # MNLI only
    output: str | None = None
    name: str | None = None  # the model's name in `distil review` (default: its folder's, or its parent's for export/)
    teacher: str | None = None  # the teacher this model was distilled from: review shows it as % of the teacher
    # Distillation during fine-tuning (the paper's "(D)"): a teacher fine-tuned on this task (a seed_<n>/model folder
    # saved by `distil finetune save_models=true`); the loss is alpha_kd x KL(teacher || model at temperature) x T^2
    # + alpha_task x the task loss (regression: MSE to the teacher's prediction). Defaults: the transformers
    # example's task-distillation script (0.5, 0.5, T = 2). Not `teacher`, which only names the pretraining teacher.
    distill_from: str | None = None
    alpha_kd: float = 0.5
    alpha_task: float = 0.5
    temperature: float = 2.0
    problem: str = "auto"  # custom task: auto | classification | regression
    seeds: int = 5
    seed: int = 42  # the first seed; the others follow it (42, 43, ...)
    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 32  # per device
    eval_batch_size: int = 64
    max_seq_len: int = 128
    # long texts: head (the first tokens), head_tail (the first head_tokens and the last ones: IMDb's best in Sun
    # et al. 2019), auto (head_tail for imdb, head elsewhere); pairs are always cut longest first
    truncation: str = "auto"
    head_tokens: int | None = None  # head_tail: tokens kept from the start (None: a quarter of the window)
    # question answering (squad, squad_v2): windows over long contexts and the answer search (qa.py)
    doc_stride: int = 128  # tokens shared by consecutive windows of a context
    max_query_len: int = 64  # questions are cut to this many tokens
    max_answer_len: int = 30  # longest answer span, in tokens
    n_best: int = 20  # start and end candidates per window
    null_threshold: float = 0.0  # squad_v2: answer "" when the null score beats the best span by more than this
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    eval_every_epoch: bool = True  # dev metrics after every epoch (else only after the last)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | fp16 | bf16 (CUDA only)
    inference: bool = True  # time a full pass over the dev set (Table 3)
    inference_batch_size: int | None = None  # None: 1 on CPU (the paper's setting), eval_batch_size on a GPU
    inference_max_examples: int | None = None  # None: the whole dev set
    inference_threads: int | None = 1  # CPU threads while timing (null: torch's default); 1 is the steadiest
    save_models: bool = False  # keep each seed's fine-tuned model in seed_<n>/model
    onnx: bool = False  # also `distil export` the median seed's model to onnx/ (needs save_models): the report
    # then holds each form's dev score, size and timing (docs/export.md)
    overwrite: bool = False  # replace an existing output folder
    tracking: bool = True
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else runs/mlflow.db
    experiment: str = "distil"

    def validate(self) -> None:
        for key in ("model", "task", "train", "dev", "output"):
            if not getattr(self, key):
                raise UserError(f"give --{key.replace('_', '-')} (see distil finetune --help)")
        checks = [("seeds", self.seeds >= 1, ">= 1"), ("epochs", self.epochs >= 1, ">= 1"),
                  ("lr", self.lr > 0, "> 0"), ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
                  ("max_seq_len", self.max_seq_len >= 8, ">= 8"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
                  ("inference_batch_size", self.inference_batch_size is None or self.inference_batch_size >= 1,
                   ">= 1 (or null)"),
                  ("inference_max_examples", self.inference_max_examples is None or self.inference_max_examples >= 1,
                   ">= 1 (or null)"),
                  ("inference_threads", self.inference_threads is None or self.inference_threads >= 1,
                   ">= 1 (or null)"), ("alpha_kd", self.alpha_kd >= 0, ">= 0"),
                  ("alpha_task", self.alpha_task >= 0, ">= 0"), ("temperature", self.temperature > 0, "> 0")]
        for key, ok, rule in checks:
            if not ok:
                raise UserError(f"{key}={getattr(self, key)} must be {rule}")
        if self.problem not in PROBLEMS:
            raise UserError(f"problem={self.problem!r}: give one of {', '.join(PROBLEMS)}")
        from distil.pretrain.finetune.model import TRUNCATIONS

        if self.truncation not in TRUNCATIONS:
            raise UserError(f"truncation={self.truncation!r}: give one of {', '.join(TRUNCATIONS)}")
        if self.head_tokens is not None and not 0 <= self.head_tokens <= self.max_seq_len - 2:
            raise UserError(f"head_tokens={self.head_tokens} must be in [0, max_seq_len - 2 = {self.max_seq_len - 2}]")
        if self.device not in DEVICES:
            raise UserError(f"device={self.device!r}: give one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision={self.precision!r}: give one of {', '.join(PRECISIONS)}")
        if self.distill_from and self.alpha_kd + self.alpha_task <= 0:
            raise UserError("alpha_kd and alpha_task are both 0: give at least one a positive weight")
        if self.onnx and not self.save_models:
            raise UserError("onnx=true exports the median seed's saved model: set save_models=true too")

    def truncation_for(self, task: TaskSpec) -> str:
        """The truncation actually used for `task` (auto resolved)."""
        from distil.pretrain.finetune.tasks import LONG_TASKS

        if self.truncation == "auto":
            return "head_tail" if task.name in LONG_TASKS else "head"
        return self.truncation

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


def model_label(path: str) -> str:
    """The folder name, or its parent's for a run's `export/` folder."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "export" and p.parent.name else p.name


def resolve_device(cfg: FinetuneConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if cfg.precision != "fp32" and device.type != "cuda":
        raise UserError(f"precision={cfg.precision} needs a CUDA GPU; use precision=fp32 on CPU")
    if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("precision=bf16: this GPU has no bf16; use fp16")
    return device


@dataclass
class Prepared:
    """Everything checked and loaded before the first seed starts."""

    task: TaskSpec
    device: torch.device
    tokenizer: Any
    model_type: str
    first_model: torch.nn.Module
    splits: dict[str, Split]  # train, dev, dev_mm, test, test_mm (those given)
    labels: dict[str, list | None]
    accepted: set[str] = field(default_factory=set)
    task_teacher: Any = None  # distill.TaskTeacher with --distill-from
    teacher_model: Any = None
    teacher_tokenizer: Any = None


def check_output(cfg: FinetuneConfig) -> Path:
    out = Path(cfg.output).resolve()  # type: ignore[arg-type]
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"--output {out} is not empty; pass --overwrite to replace it or choose another folder")
    model = Path(cfg.model).resolve()  # type: ignore[arg-type]
    if out == model or model.is_relative_to(out):
        raise UserError(f"--output {out} would replace the model folder: choose another folder")
    return out


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Every check a user's input can fail, in the order the inputs are given; no file is written."""
    from distil.pretrain.finetune.model import (
        check_tokenizer_fits,
        forward_names,
        inspect_model_folder,
        load_for_task,
        load_tokenizer,
    )

    glue = None if cfg.task.lower() == "custom" else glue_task(cfg.task)  # type: ignore[union-attr]
    for key in ("dev_mismatched", "test_mismatched"):
        if getattr(cfg, key) and (glue is None or not glue.mismatched):
            raise UserError(f"--{key.replace('_', '-')} is for mnli only (its mismatched-genre set)")
    if glue is not None and cfg.problem != "auto":
        raise UserError(f"problem={cfg.problem} is for --task custom; {glue.name} is a "
                        f"{'regression' if glue.is_regression else 'classification'} task")
    device = resolve_device(cfg)
    check_output(cfg)
    info = inspect_model_folder(cfg.model)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(cfg.model)  # type: ignore[arg-type]
    check_tokenizer_fits(info, tokenizer, cfg.max_seq_len)

    files = {"train": cfg.train, "dev": cfg.dev, "dev_mm": cfg.dev_mismatched, "test": cfg.test,
             "test_mm": cfg.test_mismatched}
    kinds = {"train": "train", "dev": "dev", "dev_mm": "dev", "test": "test", "test_mm": "test"}
    splits: dict[str, Split] = {}
    for key, path in files.items():
        if path:
            splits[key] = read_split(glue, path, kind=kinds[key])
    task = glue or infer_custom_task(splits["train"], cfg.problem)
    if cfg.truncation == "head_tail" and task.pair is not None:
        raise UserError(f"truncation=head_tail is for single-text tasks; {task.name} has text pairs (cut longest "
                        "first): use truncation=head")
    labels: dict[str, list | None] = {}
    for key, split in splits.items():
        if glue is None:
            check_pairs(task, split)
        labels[key] = encode_labels(task, split) if split.labels is not None else None
    task_teacher = teacher_model = teacher_tokenizer = None
    if cfg.distill_from:
        from distil.pretrain.finetune.distill import check_task_teacher, load_task_teacher

        task_teacher = check_task_teacher(cfg.distill_from, task, cfg.model)  # type: ignore[arg-type]
        teacher_model, teacher_tokenizer = load_task_teacher(task_teacher, task, cfg.max_seq_len)
    model = load_for_task(cfg.model, task, cfg.seed_list[0])  # type: ignore[arg-type]
    return Prepared(task, device, tokenizer, info.model_type, model, splits, labels, forward_names(model),
                    task_teacher, teacher_model, teacher_tokenizer)


def print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = sorted({k for s in report["seeds"] for k in s["dev"]}, key=lambda k: (k != "dev_score", k))
    table = Table(title=f"{report['name']} on {report['task']}: dev metrics x 100, median of {len(report['seeds'])} "
                        "seed(s)")
    table.add_column("seed", justify="left")
    for name in names:
        table.add_column(name, justify="right")
    for s in report["seeds"]:
        table.add_row(str(s["seed"]), *[f"{100 * s['dev'][k]:.2f}" if k in s["dev"] and "loss" not in k
                                        else f"{s['dev'].get(k, float('nan')):.4f}" for k in names])
    table.add_row("median", *[f"{100 * report['median'][k]:.2f}" if "loss" not in k else f"{report['median'][k]:.4f}"
                              for k in names], style="bold")
    Console(width=max(100, Console().width)).print(table)
    inference = report.get("inference")
    if inference:
        click.echo(f"parameters: {report['num_parameters']:,}; inference: a full pass over {inference['examples']} "
                   f"dev examples at batch size {inference['batch_size']} on {inference['device']} in "
                   f"{inference['seconds']:.2f} s ({inference['examples_per_s']:.1f} examples/s)")


def finetune_run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Validate, then fine-tune every seed, time inference, write the output folder and the MLflow runs."""
    from transformers import DataCollatorWithPadding
    from transformers.utils import logging as hf_logging

    from distil.pretrain.finetune.model import count_parameters, tokenize
    from distil.pretrain.finetune.qa import qa_task_name
    from distil.pretrain.finetune.runner import RunRecord, distillation_record, run_seeds, timed_inference

    version = qa_task_name(cfg.task)
    if version is not None:
        from distil.pretrain.finetune.qa_run import qa_finetune_run

        return qa_finetune_run(cfg, version)
    from distil.pretrain.finetune.tagging import tagging_task_name

    if tagging_task_name(cfg.task) is not None:
        from distil.pretrain.finetune.tagging_run import tagging_finetune_run

        return tagging_finetune_run(cfg)
    tracking = FinetuneTracking(cfg.tracking, cfg.tracking_uri, cfg.experiment)
    tracking.check()
    prep = prepare(cfg)
    out = check_output(cfg)
    task = prep.task
    truncation = cfg.truncation_for(task)
    features = {key: tokenize(prep.tokenizer, split, prep.labels[key], cfg.max_seq_len, prep.accepted, truncation,
                              cfg.head_tokens) for key, split in prep.splits.items()}
    teacher = prep.task_teacher
    record = RunRecord(cfg, task.name, prep.model_type, count_parameters(prep.first_model),
                       teacher.run_id if teacher else None, teacher.path if teacher else None, skip=QA_SETTINGS)
    distillation = None
    if teacher is not None:
        from distil.pretrain.finetune.distill import teacher_logits

        started = time.perf_counter()
        train = prep.splits["train"]
        features["train"].teacher_logits = teacher_logits(
            prep.teacher_model, prep.teacher_tokenizer, train.texts, train.pairs, cfg.max_seq_len, prep.device,
            cfg.precision, cfg.eval_batch_size, truncation, cfg.head_tokens)
        distillation = distillation_record(teacher, cfg, prep.device, time.perf_counter() - started)
        click.echo(f"distilling from {teacher.path} (dev score {teacher.dev.get('dev_score', float('nan')):.4f}): "
                   f"its logits on {len(train)} train examples in {distillation['teacher_seconds']:.1f} s; loss = "
                   f"{cfg.alpha_kd:g} x KL at T={cfg.temperature:g} + {cfg.alpha_task:g} x task")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    report = record.finish_report(
        problem="regression" if task.is_regression else "classification",
        labels=list(task.labels) if task.labels else None, metrics=list(task.metrics),
        truncation={"mode": truncation, "head_tokens": cfg.head_tokens if truncation == "head_tail" else None},
        settings=record.settings, device=str(prep.device),
        data={k: {"path": str(Path(s.path).resolve()), "examples": len(s), "skipped_rows": s.skipped,
                  "labelled": s.labels is not None} for k, s in prep.splits.items()},
        distillation=distillation)
    for split in prep.splits.values():
        if split.skipped:
            click.echo(f"{split.path}: skipped {split.skipped} rows too short for {task.name}'s columns", err=True)
    click.echo(f"fine-tuning {record.name} ({prep.model_type}, {record.num_parameters:,} parameters) on {task.name}: "
               f"{len(prep.splits['train'])} train / {len(prep.splits['dev'])} dev examples, seeds "
               f"{cfg.seed_list}, {cfg.epochs} epoch(s), lr {cfg.lr:g}, batch {cfg.batch_size}, {prep.device}")

    def load_model(seed: int):
        from distil.pretrain.finetune.model import load_for_task

        return load_for_task(cfg.model, task, seed)  # type: ignore[arg-type]

    def one_seed(seed: int, model, folder: Path):
        return run_seed(cfg, prep, seed, model, features, folder, tracking, record.run_name, record.params,
                        record.tags)

    def after(folder: Path, chosen: int, last) -> None:
        for key in ("test", "test_mm"):
            produced = folder / f"seed_{chosen}" / f"{key.replace('_mm', '_mismatched')}_predictions.tsv"
            if produced.is_file():
                shutil.copyfile(produced, folder / produced.name)
        if cfg.inference and last is not None:
            report["inference"] = timed_inference(cfg, prep.device, last, features["dev"],
                                                  DataCollatorWithPadding(prep.tokenizer))
        if cfg.onnx:
            report["forms"] = export_forms(cfg, folder / f"seed_{chosen}" / "model", folder / "onnx")

    def form_medians() -> dict[str, float]:
        medians: dict[str, float] = {}
        for form in (report.get("forms") or {}).values():
            key = form["form"].replace("-", "_")
            medians.update({f"{key}.score": form["score"], f"{key}.size_bytes": form["size_bytes"],
                            f"{key}.latency_ms_median": form["latency_ms_median"],
                            f"{key}.latency_ms_p95": form["latency_ms_p95"],
                            f"{key}.throughput_per_s": form["throughput_per_s"]})
        return medians

    return run_seeds(cfg, tracking, out, record, prep.first_model, load_model, one_seed, after, form_medians)


def export_forms(cfg: FinetuneConfig, model: Path, out: Path) -> dict[str, Any]:
    """`distil export` of the median seed's model on the dev set (the checks included: a refused form fails the
    fine-tuning's output as a whole); the forms' figures for the report."""
    from distil.pretrain.deploy.command import ExportConfig, export_model

    click.echo(f"exporting {model} to ONNX (fp32, int8) and timing each form on the dev set...")
    exported = export_model(ExportConfig(model=str(model), output=str(out), dev=cfg.dev, max_seq_len=cfg.max_seq_len,
                                         max_examples=cfg.inference_max_examples, threads=cfg.inference_threads or 1,
                                         tracking=False))
    return exported["forms"]


def load_finetune_config(config_path: str | None, overrides: tuple[str, ...], options: dict) -> FinetuneConfig:
    """`--config` file < options < `key=value` arguments."""
    shortcuts = dict(options)
    shortcuts["tracking"] = flag(shortcuts.pop("no_tracking"), False)
    shortcuts["overwrite"] = flag(shortcuts["overwrite"], True)
    return load_command_config(FinetuneConfig, config_path, only_overrides(overrides, "seeds=3"), shortcuts,
                               "seeds=3")


@click.command("finetune", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE",
              help="YAML file with any of the settings below (keys as the long options, with _). Options and "
                   "key=value arguments override it.")
@click.argument("overrides", nargs=-1, metavar="[key=value]...")
@click.option("--model", metavar="DIR", help="Encoder folder (a distil export, a saved BERT / DistilBERT).  [required]")
@click.option("--task", metavar="NAME", help=f"One of {task_names()}.  [required]")
@click.option("--train", metavar="FILE", help="Train file: the task's GLUE TSV, SQuAD JSON, an IMDb folder, or CSV / TSV / JSONL for custom.  [required]")
@click.option("--dev", metavar="FILE", help="Dev file (MNLI: matched), in the same layout.  [required]")
@click.option("--dev-mismatched", metavar="FILE", help="MNLI only: the mismatched dev file.")
@click.option("--test", metavar="FILE", help="Test file (GLUE's test layout): predictions in the output folder.")
@click.option("--test-mismatched", metavar="FILE", help="MNLI only: the mismatched test file.")
@click.option("--output", metavar="DIR", help="Output folder (report.json, predictions).  [required]")
@click.option("--seeds", type=int, help="Fine-tune with this many seeds and report the median.  [default: 5]")
@click.option("--epochs", type=int, help="  [default: 3]")
@click.option("--lr", type=float, help="Peak learning rate (linear decay).  [default: 2e-5]")
@click.option("--batch-size", type=int, help="Train batch size per device.  [default: 32]")
@click.option("--max-seq-len", type=int, help="Tokens per example (pairs truncated longest first).  [default: 128]")
@click.option("--name", help="The model's name in distil review (default: its folder's).")
@click.option("--teacher", metavar="DIR", help="The teacher this model was distilled from (review: % of teacher); "
                                                "names it only, trains nothing from it.")
@click.option("--distill-from", metavar="DIR",
              help="A teacher fine-tuned on this task (OUTPUT/seed_<n>/model of distil finetune save_models=true): "
                   "train on alpha_kd x KL(teacher || model at temperature) x T^2 + alpha_task x the task loss "
                   "(the paper's (D) step; key=value: alpha_kd, alpha_task, temperature).")
@click.option("--device", help="auto, cpu or cuda.  [default: auto]")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder.")
@click.option("--tracking-uri", help="MLflow store or server (default: MLFLOW_TRACKING_URI, else runs/mlflow.db).")
@click.option("--experiment", help="MLflow experiment.  [default: distil]")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
def finetune(config_path: str | None, overrides: tuple[str, ...], **options) -> None:
    """Fine-tune an encoder on a GLUE task or a labelled file with several seeds; report the median dev
    metrics (GLUE's), parameters and inference time, as a table, a JSON report and MLflow runs."""
    cfg = load_finetune_config(config_path, overrides, options)
    finetune_run(cfg)
    click.echo(f"report: {Path(cfg.output) / 'report.json'}")  # type: ignore[arg-type]
