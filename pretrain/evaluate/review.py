"""`distil review`: compare the MLflow runs of an experiment in the terminal and in one PNG.

One row per run: teacher (an MLM run, `mode=mlm`) or student (`mode=distill`), parameters of the exported
model, final total loss and each final loss component, final evaluation metrics (metrics named eval*),
throughput (median tokens/s over the run), steps and wall time. When the experiment holds `distil finetune`
runs, they are shown apart as the paper's GLUE table (Table 1) and size / inference table (Table 3), with a
second PNG (pretrain/finetune/glue_view.py).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from distil.common.errors import UserError
from distil.common.formatting import fmt_count, fmt_duration, fmt_number
from distil.pretrain.metrics.plots import is_loss

DEFAULT_LOCAL_STORE = Path("runs") / "mlflow.db"  # where `distil train` keeps it with the default output_dir


@dataclass
class RunSummary:
    run_id: str
    name: str
    role: str
    teacher: str  # a student's teacher.path (last two parts), "" for a teacher run
    status: str
    num_parameters: int | None
    final: dict[str, float]  # last value of every training metric, by name
    tokens_per_s: float | None
    steps: int | None
    wall_time_s: float | None
    loss_curve: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))

    @property
    def label(self) -> str:
        return f"{self.name} ({self.role})"


def default_review_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_LOCAL_STORE.resolve()}"


def open_client(tracking_uri: str):
    """An MlflowClient that fails fast with a one-line UserError when the store is missing or unreachable."""
    from distil.pretrain.tracking.transport import configure_http_client

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise UserError(f"no MLflow store at {db}; pass --tracking-uri (the local store is "
                            f"<run.output_dir>/../mlflow.db, or the URI of your tracking server)")
    configure_http_client(timeout_s=20)
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def select_runs(client: Any, experiment: str, run_ids: tuple[str, ...], filter_string: str | None,
                max_runs: int) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_experiment_by_name(experiment)
    except MlflowException as error:
        raise UserError(f"cannot read the tracking store: {str(error).splitlines()[0][:200]}") from error
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise UserError(f"no experiment named {experiment!r} (experiments there: {names}); fix --experiment")
    try:
        runs = client.search_runs([found.experiment_id], filter_string=filter_string or "",
                                  max_results=max_runs, order_by=["attributes.start_time ASC"])
    except MlflowException as error:
        raise UserError(f"bad --filter {filter_string!r}: {str(error).splitlines()[0][:200]}") from error
    if run_ids:
        by_id = {r.info.run_id: r for r in runs}
        missing = [i for i in run_ids if not any(rid.startswith(i) for rid in by_id)]
        if missing:
            raise UserError(f"no run {', '.join(missing)} in experiment {experiment!r} (with that filter); "
                            "fix --runs")
        runs = [r for r in runs if any(r.info.run_id.startswith(i) for i in run_ids)]
    if not runs:
        raise UserError(f"experiment {experiment!r} has no runs" + (" matching --filter" if filter_string else ""))
    return runs


def summarize(client: Any, run: Any) -> RunSummary:
    data, info = run.data, run.info
    history = client.get_metric_history(info.run_id, "loss") if "loss" in data.metrics else []
    history.sort(key=lambda m: m.step)
    throughput = client.get_metric_history(info.run_id, "tokens_per_s") if "tokens_per_s" in data.metrics else []
    mode = data.params.get("mode", "")
    role = {"mlm": "teacher", "distill": "student"}.get(mode, mode or "?")
    end = info.end_time or (int(time.time() * 1000) if info.status == "RUNNING" else None)
    num_parameters = data.tags.get("distil.num_parameters")
    final = {k: v for k, v in data.metrics.items() if not k.startswith("system/")}
    steps = max((m.step for m in history), default=None)
    return RunSummary(
        run_id=info.run_id, name=info.run_name or info.run_id[:8], role=role, teacher=_short_path(
            data.params.get("teacher.path", "")) if role == "student" else "", status=info.status,
        num_parameters=int(num_parameters) if num_parameters and num_parameters.isdigit() else None,
        final=final,
        tokens_per_s=statistics.median(m.value for m in throughput) if throughput else None,
        steps=steps, wall_time_s=(end - info.start_time) / 1000 if end and info.start_time else None,
        loss_curve=([m.step for m in history], [m.value for m in history]))


def _resolved(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def merge_evaluations(runs: list[Any], summaries: list[RunSummary]) -> list[RunSummary]:
    """Puts `distil evaluate` results on the row of the training run whose export they evaluated.

    An evaluation run (param mode=eval) is matched to a training run by path: its `eval.model_path` against
    the training run's `<run.output_dir>/export`. Its eval* metrics join that row (the latest evaluation
    wins). Evaluations of models trained elsewhere keep their own row; the parent `evaluate` run, which holds
    only the report, is dropped.
    """
    exports = {}
    for run, summary in zip(runs, summaries, strict=True):
        output_dir = run.data.params.get("run.output_dir")
        if run.data.params.get("mode") in ("mlm", "distill") and output_dir:
            exports[_resolved(str(Path(output_dir) / "export"))] = summary
    kept = []
    for run, summary in zip(runs, summaries, strict=True):
        mode = run.data.params.get("mode")
        if mode == "evaluate":
            continue
        if mode == "eval":
            target = exports.get(_resolved(run.data.params.get("eval.model_path", "")))
            if target is not None:
                target.final.update({k: v for k, v in summary.final.items() if k.startswith("eval")})
                continue
        kept.append(summary)
    return kept


def table_columns(summaries: list[RunSummary]) -> tuple[list[str], list[str]]:
    """The loss components and evaluation metrics any of the runs has, in a stable order."""
    names = {k for s in summaries for k in s.final}
    losses = sorted(k for k in names if is_loss(k) and k != "loss")
    evals = sorted(k for k in names if k.startswith("eval"))
    return losses, evals


def _short_path(path: str) -> str:
    """The last two parts of a path or hub name ("runs/teacher/export" -> "teacher/export")."""
    return "/".join(Path(path).parts[-2:]) if path else ""


def render_table(summaries: list[RunSummary], title: str) -> None:
    """One column per field and a row per run; with more fields than fit across, one column per run."""
    from rich.console import Console
    from rich.table import Table

    losses, evals = table_columns(summaries)
    fields = ["run", "id", "role", "teacher", "status", "params", "loss", *losses, *evals, "tokens/s", "steps",
              "wall time"]
    # teachers first, then students by final loss
    ordered = sorted(summaries, key=lambda s: (s.role != "teacher", s.final.get("loss", float("inf"))))
    rows = [[s.name, s.run_id[:8], s.role, s.teacher or "-", s.status, fmt_count(s.num_parameters),
             fmt_number(s.final.get("loss")), *[fmt_number(s.final.get(k)) for k in losses],
             *[fmt_number(s.final.get(k)) for k in evals], fmt_number(s.tokens_per_s, ",.0f"),
             fmt_number(s.steps, "d") if s.steps is not None else "-", fmt_duration(s.wall_time_s)] for s in ordered]
    console = Console(width=max(160, Console().width))
    table = Table(title=title, header_style="bold")
    left = ("run", "id", "role", "teacher", "status")
    width_needed = sum(max(len(f), *(len(r[i]) for r in rows)) + 3 for i, f in enumerate(fields))
    if width_needed <= console.width:
        for column in fields:
            table.add_column(column, justify="left" if column in left else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
    else:
        table.add_column("", justify="left", no_wrap=True)
        for row in rows:
            table.add_column(row[0], justify="right", no_wrap=True)
        for i, field_name in enumerate(fields[1:], start=1):
            table.add_row(field_name, *[row[i] for row in rows])
    console.print(table)


def write_comparison_plot(summaries: list[RunSummary], output: Path, title: str) -> Path:
    from distil.pretrain.metrics.plots import plot_run_comparison

    curves = {s.label: s.loss_curve for s in summaries if s.loss_curve[0]}
    bars: dict[str, dict[str, float]] = {}
    throughput = {s.label: s.tokens_per_s for s in summaries if s.tokens_per_s is not None}
    if throughput:
        bars["tokens/s (median)"] = throughput
    evals = table_columns(summaries)[1]
    if evals:
        key = evals[0]
        bars[key] = {s.label: s.final[key] for s in summaries if key in s.final}
    return plot_run_comparison(curves, bars, output, title=title)


@click.command("review")
@click.option("--experiment", required=True, help="MLflow experiment whose runs to compare.")
@click.option("--tracking-uri", default=None,
              help="Tracking server or store (default: MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db).")
@click.option("--runs", "run_ids", multiple=True,
              help="Only these run ids (a unique prefix is enough); repeat the option for several.")
@click.option("--filter", "filter_string", default=None,
              help="MLflow search filter, e.g. \"params.mode = 'distill' and metrics.loss < 3\".")
@click.option("--max-runs", default=50, show_default=True, type=click.IntRange(1, 10000))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("comparison.png"),
              show_default=True, help="Where to write the comparison plot (PNG).")
def review(experiment: str, tracking_uri: str | None, run_ids: tuple[str, ...], filter_string: str | None,
           max_runs: int, output: Path) -> None:
    """Compare the runs of an experiment: teacher vs students, in a table and a plot."""
    from distil.pretrain.tracking.links import describe_link

    uri = tracking_uri or default_review_uri()
    client = open_client(uri)
    runs = select_runs(client, experiment, run_ids, filter_string, max_runs)
    from distil.pretrain.deploy.view import is_export_run, render_export_table
    from distil.pretrain.finetune.glue_view import is_finetune_run, review_glue

    # fine-tunings: the GLUE view below; exports: the table of forms
    training = [run for run in runs if not is_finetune_run(run) and not is_export_run(run)]
    if training:
        summaries = merge_evaluations(training, [summarize(client, run) for run in training])
        render_table(summaries, title=f"experiment {experiment}: {len(summaries)} run(s)")
        path = write_comparison_plot(summaries, output, title=f"experiment {experiment}")
        click.echo(f"comparison plot: {path}")
    glue_plot = review_glue(client, experiment, runs[0].info.experiment_id, filter_string, run_ids,
                            output.with_name(f"{output.stem}_glue.png"))
    if glue_plot is not None:
        click.echo(f"GLUE plot: {glue_plot}")
    from rich.console import Console

    render_export_table(runs, experiment, Console(width=max(160, Console().width)))
    click.echo(f"in the MLflow UI: {describe_link(uri, runs[0].info.experiment_id)}")
