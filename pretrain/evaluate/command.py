"""`distil evaluate`: held-out masked-LM metrics of a teacher and its students, as MLflow runs.

Every model sees exactly the same masked batches: the held-out split is streamed once with a fixed seed and
each batch goes through every model before the next one is read (so nothing has to be kept in memory, and
the teacher's distribution is at hand for KL(teacher || student) without storing logits).

Per model: masked-LM loss (mean cross-entropy over the masked positions), perplexity (exp of it), top-1 /
top-5 accuracy on the masked positions, parameter count and measured inference throughput (non-padding
tokens per second of forward time, the first batch left out as warm-up when there are more); with a teacher:
KL(teacher || student) at temperature 1 averaged over the masked positions, and top-1 agreement with it.
Which tokens are masked follows --mask-smoothing: the recipe's count^-0.7 weighting by default (mostly rare
tokens, hard to predict: losses read higher), 0 for BERT's uniform choice.

MLflow (unless --no-tracking): one parent run for the evaluation (its settings as params, the JSON report as
artifact `eval/report.json`) and one child run per model (tag `mlflow.parentRunId`, param `mode=eval`,
metrics `eval_mlm_loss`, `eval_perplexity`, `eval_top1_accuracy`, ...), so `distil review` lists one row per
evaluated model with its eval* columns. Every run has the held-out split as its dataset input, and each child
run the model it evaluated as its model input (the run's own logged model when a tracked run exported it).
The store is chosen as for training (pretrain.tracking); the report and the last line give the experiment's
link in the UI's model-training view.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import torch

from distil.common.config import flag, load_command_config, only_overrides
from distil.common.errors import UserError
from distil.common.files import atomic_write_json
from distil.common.formatting import fmt_count, fmt_number
from distil.pretrain.evaluate.heldout import ModelResult, eval_metrics, run_evaluation
from distil.pretrain.models import load_masked_lm
from distil.pretrain.tracking.config import command_tracking_config

DEFAULT_STORE_RUN_DIR = Path("runs") / "evaluate"  # default store: runs/mlflow.db, as `distil train` and review


@dataclass
class EvaluateConfig:
    """`distil evaluate`'s settings: a YAML file (`--config`), its options and `key=value` overrides."""

    models: list[str] = field(default_factory=list)  # exported masked-LM folders (a run's export/)
    shards: str | None = None  # a shard set made by distil prepare with a held-out split
    teacher: str | None = None  # also evaluated; students then get KL(teacher||student) and agreement
    max_batches: int | None = None  # None: the whole held-out split
    batch_size: int = 32
    seed: int = 0  # seed of the masks: same seed, same batches
    mask_smoothing: float = 0.7  # masking probability ~ count^-S; 0: uniform, as BERT's own evaluation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output: str = "eval_report.json"
    tracking: bool = True
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else runs/mlflow.db
    experiment: str = "distil"

    def validate(self) -> None:
        if not self.models and not self.teacher:
            raise UserError("give at least one --model (or --teacher) folder")
        if not self.shards:
            raise UserError("give --shards (a shard set made by distil prepare with --holdout-fraction > 0)")
        if self.max_batches is not None and self.max_batches < 1:
            raise UserError(f"--max-batches {self.max_batches} must be >= 1")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be >= 1")
        if self.mask_smoothing < 0:
            raise UserError(f"--mask-smoothing {self.mask_smoothing} must be >= 0 (0: uniform, as BERT; 0.7: the "
                            "recipe's)")


def model_name(path: str, taken: set[str]) -> str:
    """A short unique name: the folder name, or its parent's for a run's `export/` folder."""
    p = Path(path)
    base = p.parent.name if p.name == "export" and p.parent.name else p.name or str(p)
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def holdout_stream(shards: str, batch_size: int, seed: int, mask_smoothing: float = 0.7):
    from distil.data_pipeline.masking import MaskingConfig
    from distil.data_pipeline.stream.loader import PretrainStream

    return PretrainStream(shards, split="holdout", batch_size=batch_size,
                          masking=MaskingConfig(smoothing=mask_smoothing), seed=seed, num_workers=0)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def print_table(results: list[ModelResult], counts: dict[str, int], device: torch.device) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out masked LM: {counts['batches']} batches, {counts['masked_tokens']:,} masked "
                        f"tokens, {device.type}")
    for column in ("model", "role", "params", "loss", "ppl", "top-1", "top-5", "KL(t||s)", "agree", "tokens/s"):
        table.add_column(column, justify="left" if column in ("model", "role") else "right")
    for r in results:
        table.add_row(r.name, r.role, fmt_count(r.num_parameters), fmt_number(r.mlm_loss), fmt_number(r.perplexity),
                      fmt_number(r.top1_accuracy, ".3f"), fmt_number(r.top5_accuracy, ".3f"), fmt_number(r.kl_from_teacher),
                      fmt_number(r.teacher_agreement, ".3f"), fmt_number(r.tokens_per_s, ",.0f"))
    Console(width=max(130, Console().width)).print(table)


def track(report: dict[str, Any], report_path: Path, results: list[ModelResult], tracking_uri: str | None,
          experiment: str) -> None:
    """Parent run (settings, report artifact) + one child run per model. Never raises for tracking trouble:
    the tracker logs a warning and evaluation results stay in the report."""
    from distil.data_pipeline.manifest import load_manifest
    from distil.pretrain.tracking.links import serve_command
    from distil.pretrain.tracking.mlflow_tracker import create_tracker
    from distil.pretrain.tracking.params import redact_uri

    def tracker_for(run_name: str):
        cfg = command_tracking_config(tracking_uri, experiment, run_name)
        return create_tracker(cfg, rank=0, local_rank=0, world_size=1, run_dir=str(DEFAULT_STORE_RUN_DIR),
                              source="distil evaluate")

    settings = {k: report[k] for k in ("shards", "split", "batch_size", "seed", "mask_smoothing", "max_batches",
                                       "device")}
    parent = tracker_for("evaluate")
    uri = getattr(parent, "uri", None)
    report["mlflow"] = {"experiment": experiment, "run_id": parent.run_id,
                        "child_run_ids": {}, "tracking_uri": redact_uri(uri) if uri else None,
                        "experiment_url": parent.ui_link(run=False), "run_url": parent.ui_link(),
                        "ui_command": serve_command(uri) if uri else None}
    children = []
    if parent.run_id is None:  # tracking off, or the store did not answer: the report alone holds the results
        atomic_write_json(report_path, report)
        parent.finish("FINISHED")
        if type(parent).__name__ != "NullTracker":
            click.echo("MLflow did not answer: this evaluation is not tracked (the report has every result)",
                       err=True)
        return
    manifest, _ = load_manifest(report["shards"])
    parent.log_inputs(report["shards"], manifest, split=report["split"], context="evaluation")
    with tempfile.TemporaryDirectory(prefix="distil-eval-") as tmp:
        for r in results:
            child = tracker_for(f"eval-{r.name}")
            child.log_inputs(report["shards"], manifest, split=report["split"], context="evaluation", model=r.path,
                             model_role=r.role)
            report["mlflow"]["child_run_ids"][r.name] = child.run_id
            tags = {"distil.num_parameters": str(r.num_parameters), "distil.eval.model_path": r.path,
                    "mlflow.parentRunId": parent.run_id}
            child.set_tags(tags)
            child.log_params({"mode": "eval", "eval.role": r.role, "eval.model_path": r.path,
                              "eval.model_type": r.model_type, "eval.teacher": report["teacher"] or "",
                              **{f"eval.{k}": v for k, v in settings.items()}})
            child.log_metrics(eval_metrics(r), step=0)
            children.append(child)
        atomic_write_json(report_path, report)  # now with the run ids
        artifact = Path(tmp) / "report.json"
        artifact.write_text(report_path.read_text())
        parent.log_params({"mode": "evaluate", "eval.models": ",".join(r.name for r in results),
                           "eval.teacher": report["teacher"] or "", **{f"eval.{k}": v for k, v in settings.items()}})
        parent.log_artifact(str(artifact), artifact_path="eval")
        for child in children:
            child.finish("FINISHED")
        parent.finish("FINISHED")  # waits until the artifact was sent, before the temp folder goes
    link, command = report["mlflow"]["experiment_url"], report["mlflow"]["ui_command"]
    if link:
        click.echo(f"MLflow: {link}" + (f" (after: {command})" if command else ""))


def evaluate_models(cfg: EvaluateConfig) -> tuple[dict[str, Any], list[ModelResult]]:
    """Loads and checks every model, evaluates them on the same held-out batches; returns (report, results)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model otherwise
    device = pick_device(cfg.device)
    stream = holdout_stream(cfg.shards, cfg.batch_size, cfg.seed, cfg.mask_smoothing)
    taken: set[str] = set()
    entries = []
    teacher_name = None
    if cfg.teacher:
        teacher_name = model_name(cfg.teacher, taken)
        entries.append((teacher_name, cfg.teacher))
    entries += [(model_name(p, taken), p) for p in cfg.models]
    loaded = [(name, path, load_masked_lm(path, stream.manifest, device)) for name, path in entries]
    total = min(stream.batches_per_epoch(), cfg.max_batches or stream.batches_per_epoch())
    from tqdm import tqdm

    with tqdm(total=total, desc="evaluate", unit="batch", leave=False, disable=None) as bar:
        results, counts = run_evaluation(loaded, stream, device, cfg.max_batches, teacher_name,
                                         progress=lambda: bar.update(1))
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "shards": str(cfg.shards),
        "split": "holdout", "batch_size": cfg.batch_size, "seed": cfg.seed, "mask_smoothing": cfg.mask_smoothing,
        "max_batches": cfg.max_batches, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "teacher": teacher_name, **counts,
        "models": [asdict(r) for r in results],
    }
    print_table(results, counts, device)
    return report, results


def load_evaluate_config(config_path: str | None, overrides: tuple[str, ...], options: dict) -> EvaluateConfig:
    """`--config` file < options < `key=value` arguments."""
    shortcuts = dict(options)
    shortcuts["models"] = list(shortcuts["models"]) or None
    shortcuts["tracking"] = flag(shortcuts.pop("no_tracking"), False)
    return load_command_config(EvaluateConfig, config_path, only_overrides(overrides, "batch_size=16"), shortcuts,
                               "batch_size=16")


@click.command("evaluate", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE",
              help="YAML file with any of the settings below (keys as the long options, with _: batch_size; "
                   "models: a list). Options and key=value arguments override it.")
@click.argument("overrides", nargs=-1, metavar="[key=value]...")
@click.option("--model", "models", multiple=True, metavar="DIR",
              help="An exported masked-LM folder (a run's export/). Repeat for several.")
@click.option("--shards", metavar="SHARDS", help="Shard set made by distil prepare with a held-out split.  [required]")
@click.option("--teacher", metavar="DIR", help="Teacher folder: also evaluated, and students get KL + agreement.")
@click.option("--max-batches", type=int, help="Evaluate at most this many held-out batches (default: all).")
@click.option("--batch-size", type=int, help="  [default: 32]")
@click.option("--seed", type=int, help="Seed of the masks (same seed, same batches).  [default: 0]")
@click.option("--mask-smoothing", type=float,
              help="Which tokens are masked: probability ~ count^-S (0.7: the recipe's, favouring rare tokens; "
                   "0: uniform, as BERT's own evaluation).  [default: 0.7]")
@click.option("--device", help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option("--output", type=click.Path(dir_okay=False),
              help="JSON report (written atomically).  [default: eval_report.json]")
@click.option("--tracking-uri", help="MLflow store or server (default: MLFLOW_TRACKING_URI, else runs/mlflow.db).")
@click.option("--experiment", help="MLflow experiment.  [default: distil]")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
def evaluate(config_path: str | None, overrides: tuple[str, ...], **options) -> None:
    """Held-out masked-LM loss, perplexity, top-1/5 accuracy, size and throughput of each model (with
    --teacher: KL(teacher||student) and top-1 agreement), as a table, a JSON report and MLflow runs."""
    cfg = load_evaluate_config(config_path, overrides, options)
    if cfg.tracking:
        command_tracking_config(cfg.tracking_uri, cfg.experiment)  # a bad URI fails before the models are run
    report, results = evaluate_models(cfg)
    report_path = Path(cfg.output)
    if not cfg.tracking:
        report["mlflow"] = None
        atomic_write_json(report_path, report)
    else:
        track(report, report_path, results, cfg.tracking_uri, cfg.experiment)
    click.echo(f"report: {report_path}")
