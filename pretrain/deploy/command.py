"""`distil export`: a student (or teacher) as it will be served. The model folder becomes an ONNX model (and an
int8 one for CPUs, optionally an fp16 one for GPUs) beside its tokenizer and config, each form checked on the
dev set before anything is written: the ONNX fp32 outputs against PyTorch's within a tolerance, the int8
model's dev score against PyTorch's within a drop the user sets. Every form is timed the paper's way (Table 3:
batch 1 over the dev set, median and p95; and throughput at batch 32), threads pinned, tokenisation excluded.
A JSON report, an MLflow run linked to the model's own run and, with --register, the ONNX model in the
registry; `distil review` shows the runs as a table of forms.

    OUTPUT/model.onnx, model.int8.onnx (, model.fp16.onnx)   the forms
    OUTPUT/config.json, tokenizer files (, distil_task.json)  beside them, so the folder is self-contained
    OUTPUT/export_report.json                                 settings, checks, score and timing per form
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from distil.common.config import flag, load_command_config, only_overrides
from distil.common.errors import UserError
from distil.common.files import atomic_write_folder
from distil.pretrain.deploy import runtime
from distil.pretrain.deploy.source import TASK_FILE, DevSet, Source, dev_set, load_source, score

REPORT = "export_report.json"
FORMS = ("pytorch-fp32", "onnx-fp32", "onnx-int8", "onnx-fp16")
FILES = {"onnx-fp32": "model.onnx", "onnx-int8": "model.int8.onnx", "onnx-fp16": "model.fp16.onnx"}
DEFAULT_STORE_RUN_DIR = Path("runs") / "export"


@dataclass
class ExportConfig:
    """`distil export`'s settings: a YAML file (`--config`), its options and `key=value` overrides."""

    model: str | None = None  # a model folder: distil finetune's seed_<n>/model, or a run's export/
    output: str | None = None
    dev: str | None = None  # the task's labelled dev file (classifier) or a text file, one text per line (MLM)
    task: str | None = None  # GLUE task name, for a classifier without distil_task.json
    max_seq_len: int = 128
    max_examples: int | None = None  # None: the whole dev set (the paper's full pass)
    int8: bool = True
    fp16: bool = False
    opset: int = 18
    atol: float = 1e-4  # ONNX fp32 vs PyTorch: |onnx - torch| <= atol + rtol * |torch| for every output value
    rtol: float = 1e-3
    max_score_drop: float = 1.0  # points (score x 100) the int8 / fp16 model may lose against PyTorch
    threads: int = 1  # CPU threads while timing (and checking); 1 is the paper's single-CPU setting
    throughput_batch: int = 32
    overwrite: bool = False
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str = "distil"
    register: str | None = None  # registered model name for the ONNX model (None: not registered)

    def validate(self) -> None:
        for key in ("model", "output", "dev"):
            if not getattr(self, key):
                raise UserError(f"give --{key}")
        checks = (("max_seq_len", self.max_seq_len >= 8, ">= 8"), ("threads", self.threads >= 1, ">= 1"),
                  ("throughput_batch", self.throughput_batch >= 1, ">= 1"),
                  ("max_examples", self.max_examples is None or self.max_examples >= 2, ">= 2"),
                  ("atol", self.atol >= 0, ">= 0"), ("rtol", self.rtol >= 0, ">= 0"),
                  ("max_score_drop", self.max_score_drop >= 0, ">= 0 (points)"))
        for key, ok, rule in checks:
            if not ok:
                raise UserError(f"--{key.replace('_', '-')} {getattr(self, key)} must be {rule}")


def check_output(cfg: ExportConfig) -> Path:
    out = Path(cfg.output)  # type: ignore[arg-type]
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"--output {out} is not empty: pass --overwrite to replace it, or give another folder")
    return out


def _torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _export_sample(dev: DevSet) -> dict[str, torch.Tensor]:
    """A padded batch of at least two rows (a batch axis of size 1 would be specialised by the exporter)."""
    batch = dev.batches[0]
    if next(iter(batch.values())).shape[0] < 2:
        batch = {k: np.concatenate([v, v]) for k, v in batch.items()}
    return _torch_batch(batch)


def compare(reference: list[np.ndarray], other: list[np.ndarray], atol: float, rtol: float) -> dict[str, Any]:
    worst_abs = worst_excess = 0.0
    for ref, out in zip(reference, other, strict=True):
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        worst_abs = max(worst_abs, float(diff.max()))
        worst_excess = max(worst_excess, float((diff - (atol + rtol * np.abs(ref))).max()))
    return {"max_abs_diff": worst_abs, "atol": atol, "rtol": rtol, "passed": worst_excess <= 0.0}


def measure_form(name: str, run: runtime.Runner, source: Source, dev: DevSet, files: list[Path],
                 reference: dict[str, Any] | None, check=None) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The form's outputs and dev score; then `check(form, outputs)` (which raises to refuse it) before any
    time is spent timing it."""
    outputs = [run(batch) for batch in dev.batches]
    metrics = score(source, outputs, dev)
    form: dict[str, Any] = {"form": name, "files": [f.name for f in files],
                            "size_bytes": runtime.size_on_disk(files), "score": metrics["score"], "metrics": metrics}
    if reference is not None:
        form["score_drop_points"] = 100.0 * (reference["score"] - metrics["score"])
    if check is not None:
        check(form, outputs)
    form.update(asdict(runtime.time_runner(run, dev.singles, dev.batches, dev.examples)))
    return form, outputs


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """Validate, export, check and time every form; the output folder appears only if every check passed."""
    cfg.validate()
    runtime.require_extra()
    runtime.check_opset(cfg.opset)
    out = check_output(cfg)
    source = load_source(cfg.model, cfg.task)  # type: ignore[arg-type]
    dev = dev_set(source, cfg.dev, cfg.max_seq_len, cfg.throughput_batch, cfg.max_examples)  # type: ignore[arg-type]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    report: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "model": str(source.path.resolve()),
        "kind": source.kind, "family": source.family, "task": source.task.name if source.task else None,
        "dev": str(Path(cfg.dev).resolve()), "examples": dev.examples, "max_seq_len": cfg.max_seq_len,  # type: ignore[arg-type]
        "num_parameters": int(sum(p.numel() for p in source.model.parameters())), "opset": cfg.opset,
        "threads": cfg.threads, "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "versions": _versions(), "timing": "forward only: inputs tokenised and padded beforehand",
        "source_run_id": source.run_id, "max_score_drop": cfg.max_score_drop, "forms": {}, "check": None,
    }

    def fill(folder: Path) -> None:
        forms = report["forms"]
        forms["pytorch-fp32"], reference = measure_form("pytorch-fp32", runtime.torch_runner(source.model), source,
                                                        dev, source.weight_files, None)
        torch_metrics = forms["pytorch-fp32"]["metrics"]

        def close_to_pytorch(_form: dict[str, Any], outputs: list[np.ndarray]) -> None:
            report["check"] = compare(reference, outputs, cfg.atol, cfg.rtol)
            if not report["check"]["passed"]:
                raise UserError(f"the ONNX model's outputs differ from PyTorch's by up to "
                                f"{report['check']['max_abs_diff']:.3g} (allowed: {cfg.atol:g} + {cfg.rtol:g} x "
                                f"|output|) on {cfg.dev}: nothing written; raise --atol/--rtol if that is acceptable, "
                                "or try another --opset")

        def score_kept(form: dict[str, Any], _outputs: list[np.ndarray]) -> None:
            drop = form["score_drop_points"]
            if drop > cfg.max_score_drop:
                without = "--no-int8" if form["form"] == "onnx-int8" else "without --fp16"
                raise UserError(f"the {form['form']} model scores {drop:.2f} points below PyTorch on {cfg.dev} "
                                f"(allowed: {cfg.max_score_drop:g}): nothing written; raise --max-score-drop to "
                                f"accept it, or export {without}")

        runtime.export_onnx(source.model, _export_sample(dev), folder / FILES["onnx-fp32"], cfg.opset)
        forms["onnx-fp32"], _ = measure_form("onnx-fp32", runtime.onnx_runner(folder / FILES["onnx-fp32"], cfg.threads),
                                             source, dev, _model_files(folder, FILES["onnx-fp32"]), torch_metrics,
                                             close_to_pytorch)
        for name, wanted, convert in (("onnx-int8", cfg.int8, runtime.quantize_int8),
                                      ("onnx-fp16", cfg.fp16, runtime.convert_fp16)):
            if wanted:
                convert(folder / FILES["onnx-fp32"], folder / FILES[name])
                forms[name], _ = measure_form(name, runtime.onnx_runner(folder / FILES[name], cfg.threads), source,
                                              dev, _model_files(folder, FILES[name]), torch_metrics, score_kept)
        source.model.config.save_pretrained(str(folder))
        source.tokenizer.save_pretrained(str(folder))
        if (source.path / TASK_FILE).is_file():
            shutil.copy2(source.path / TASK_FILE, folder / TASK_FILE)
        (folder / REPORT).write_text(_json(report))

    try:
        atomic_write_folder(out, fill)
    finally:
        torch.set_num_threads(threads)  # the caller's (distil finetune onnx=true goes on after)
    return report


def _model_files(folder: Path, name: str) -> list[Path]:
    """The .onnx file and its external-data file, when the exporter wrote one (models over 2 GB)."""
    return [p for p in (folder / name, folder / f"{name}.data") if p.is_file()]


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")}


def _json(report: dict[str, Any]) -> str:
    import json

    return json.dumps(report, indent=2, default=float) + "\n"


def print_forms(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']} ({report['kind']}, {report['examples']} dev examples, "
                        f"{report['threads']} thread(s), CPU)")
    for column in ("form", "size MB", "score", "drop (points)", "batch 1 median ms", "batch 1 p95 ms",
                   f"batch {next(iter(report['forms'].values()))['throughput_batch']} examples/s"):
        table.add_column(column, justify="left" if column == "form" else "right")
    for form in report["forms"].values():
        drop = form.get("score_drop_points")
        table.add_row(form["form"], f"{form['size_bytes'] / 1e6:.1f}", f"{100 * form['score']:.2f}",
                      "" if drop is None else f"{drop:+.2f}", f"{form['latency_ms_median']:.2f}",
                      f"{form['latency_ms_p95']:.2f}", f"{form['throughput_per_s']:.1f}")
    Console(width=160).print(table)
    check = report["check"]
    click.echo(f"ONNX fp32 vs PyTorch: max |difference| {check['max_abs_diff']:.2e} (allowed {check['atol']:g} + "
               f"{check['rtol']:g} x |output|)")


def track(report: dict[str, Any], out: Path, cfg: ExportConfig) -> None:
    """One MLflow run: settings, per-form metrics, the report; linked to the model's own run by tag; with
    --register, the ONNX model registered. Tracking trouble never fails the export (the report has it all)."""
    from distil.pretrain.tracking.config import command_tracking_config
    from distil.pretrain.tracking.mlflow_tracker import create_tracker

    name = f"export-{Path(report['model']).name}"
    tracker = create_tracker(command_tracking_config(cfg.tracking_uri, cfg.experiment, name), rank=0, local_rank=0,
                             world_size=1, run_dir=str(DEFAULT_STORE_RUN_DIR), source="distil export")
    report["mlflow"] = {"experiment": cfg.experiment, "run_id": tracker.run_id, "registered": None}
    if tracker.run_id is None:
        tracker.finish("FINISHED")
        return
    tags = {"distil.export.model_path": report["model"], "distil.num_parameters": str(report["num_parameters"]),
            "distil.export.output": str(out.resolve())}
    if report["source_run_id"]:
        tags["distil.export.source_run_id"] = report["source_run_id"]
    tracker.set_tags(tags)
    tracker.log_params({"mode": "export", "export.model": report["model"], "export.kind": report["kind"],
                        "export.family": report["family"], "export.task": report["task"] or "",
                        "export.dev": report["dev"], "export.opset": cfg.opset, "export.threads": cfg.threads,
                        "export.forms": ",".join(report["forms"]), "export.max_score_drop": cfg.max_score_drop})
    metrics: dict[str, float] = {"check_max_abs_diff": report["check"]["max_abs_diff"]}
    for form in report["forms"].values():
        key = form["form"].replace("-", "_")
        for field_name in ("score", "size_bytes", "latency_ms_median", "latency_ms_p95", "throughput_per_s",
                           "score_drop_points"):
            if form.get(field_name) is not None:
                metrics[f"{key}.{field_name}"] = float(form[field_name])
    tracker.log_metrics(metrics, step=0)
    with tempfile.TemporaryDirectory(prefix="distil-export-") as tmp:
        artifact = Path(tmp) / REPORT
        artifact.write_text(_json(report))
        tracker.log_artifact(str(artifact), artifact_path="export")
        served = "onnx-int8" if "onnx-int8" in report["forms"] else "onnx-fp32"
        tracker.log_artifact(str(out / FILES[served]), artifact_path="onnx")
        tracker.finish("FINISHED")
    if cfg.register:
        report["mlflow"]["registered"] = register(tracker, report["mlflow"]["run_id"], cfg.register,
                                                  f"onnx/{FILES[served]}")


def register(tracker: Any, run_id: str, name: str, artifact: str) -> str | None:
    """A version of registered model `name` whose source is the run's ONNX artifact; None if the store refused."""
    import mlflow

    try:
        client = mlflow.MlflowClient(getattr(tracker, "uri", None))
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name)
        version = client.create_model_version(name, source=f"runs:/{run_id}/{artifact}", run_id=run_id,
                                              tags={"distil.form": Path(artifact).name})
        client.set_tag(run_id, "distil.registered_model", f"{name}/{version.version}")
        return f"{name}/{version.version}"
    except Exception as error:  # noqa: BLE001 - the export stands; registration is reported as not done
        click.echo(f"warning: the ONNX model was not registered as {name}: {str(error).splitlines()[0][:200]}",
                   err=True)
        return None


def load_export_config(config_path: str | None, overrides: tuple[str, ...], options: dict) -> ExportConfig:
    shortcuts = dict(options)
    shortcuts["tracking"] = flag(shortcuts.pop("no_tracking"), False)
    shortcuts["overwrite"] = flag(shortcuts["overwrite"], True)
    shortcuts["fp16"] = flag(shortcuts["fp16"], True)
    int8 = shortcuts.pop("int8")
    shortcuts["int8"] = None if int8 is None else int8
    return load_command_config(ExportConfig, config_path, only_overrides(overrides, "opset=18"), shortcuts,
                               "opset=18")


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE",
              help="YAML file with any of the settings below (keys as the long options, with _). Options and "
                   "key=value arguments override it.")
@click.argument("overrides", nargs=-1, metavar="[key=value]...")
@click.option("--model", metavar="DIR", help="A fine-tuned classifier (distil finetune save_models=true: "
                                             "seed_<n>/model) or a masked LM (a run's export/).  [required]")
@click.option("--output", metavar="DIR", help="Folder for the ONNX model(s), tokenizer and report.  [required]")
@click.option("--dev", metavar="FILE", help="The task's labelled dev file (as distil finetune reads it), or for a "
                                            "masked LM a text file, one text per line.  [required]")
@click.option("--task", help="The GLUE task a classifier was fine-tuned on (read from distil_task.json if absent).")
@click.option("--max-seq-len", type=int, help="Tokens per example.  [default: 128]")
@click.option("--max-examples", type=int, help="Use the first N dev examples (default: all, the paper's full pass).")
@click.option("--int8/--no-int8", default=None, help="Also write a dynamic-int8 model for CPUs.  [default: --int8]")
@click.option("--fp16", is_flag=True, help="Also write an fp16 model for GPUs (checked on this machine's runtime).")
@click.option("--opset", type=int, help="ONNX opset.  [default: 18]")
@click.option("--atol", type=float, help="ONNX fp32 vs PyTorch: absolute tolerance per output value.  [default: 1e-4]")
@click.option("--rtol", type=float, help="... plus this share of |output|.  [default: 1e-3]")
@click.option("--max-score-drop", type=float,
              help="Points (score x 100) the int8/fp16 model may lose on the dev set; more is refused.  [default: 1]")
@click.option("--threads", type=int, help="CPU threads while timing.  [default: 1]")
@click.option("--throughput-batch", type=int, help="Batch size of the throughput pass.  [default: 32]")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output.")
@click.option("--tracking-uri", help="MLflow store or server (default: MLFLOW_TRACKING_URI, else runs/mlflow.db).")
@click.option("--experiment", help="MLflow experiment.  [default: distil]")
@click.option("--register", metavar="NAME", help="Register the ONNX model (int8 if written) under this name.")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
def export(config_path: str | None, overrides: tuple[str, ...], **options) -> None:
    """A model folder as ONNX (fp32, dynamic int8, optionally fp16) with its tokenizer, checked against PyTorch on
    the dev set and timed per form (batch 1 median/p95, batch 32 throughput), as a report and an MLflow run."""
    cfg = load_export_config(config_path, overrides, options)
    if cfg.tracking:
        from distil.pretrain.tracking.config import command_tracking_config

        command_tracking_config(cfg.tracking_uri, cfg.experiment)  # a bad URI fails before any work
    report = export_model(cfg)
    out = Path(cfg.output)  # type: ignore[arg-type]
    print_forms(report)
    if cfg.tracking:
        track(report, out, cfg)
        (out / REPORT).write_text(_json(report))  # now with the run id
    click.echo(f"wrote {out} (report: {out / REPORT})")
