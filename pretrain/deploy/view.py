"""`distil review`'s table of an experiment's exports: the paper's Table 3 where students run. One row per model
and form (PyTorch fp32, ONNX fp32, ONNX int8, ONNX fp16): parameters, size on disk, dev score, latency at batch 1
(median, p95), throughput, and the speed-up at batch 1 against the largest model's PyTorch fp32 form on the same
task (the teacher, when teacher and students were exported)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMS = ("pytorch-fp32", "onnx-fp32", "onnx-int8", "onnx-fp16")


def is_export_run(run: Any) -> bool:
    return run.data.params.get("mode") == "export"


@dataclass
class FormRow:
    model: str
    task: str
    form: str
    parameters: int | None
    size_bytes: float | None
    score: float | None
    drop: float | None
    median_ms: float | None
    p95_ms: float | None
    throughput: float | None
    threads: str


def form_rows(runs: list[Any]) -> list[FormRow]:
    rows = []
    for run in runs:
        if not is_export_run(run):
            continue
        params, metrics = run.data.params, run.data.metrics
        parameters = run.data.tags.get("distil.num_parameters")
        for form in FORMS:
            key = form.replace("-", "_")
            if f"{key}.latency_ms_median" not in metrics:
                continue
            rows.append(FormRow(Path(params.get("export.model", "?")).name if params.get("export.model") else "?",
                                params.get("export.task") or params.get("export.kind", ""), form,
                                int(parameters) if parameters else None, metrics.get(f"{key}.size_bytes"),
                                metrics.get(f"{key}.score"), metrics.get(f"{key}.score_drop_points"),
                                metrics.get(f"{key}.latency_ms_median"), metrics.get(f"{key}.latency_ms_p95"),
                                metrics.get(f"{key}.throughput_per_s"), params.get("export.threads", "?")))
    return rows


def reference_latency(rows: list[FormRow]) -> dict[str, tuple[str, float]]:
    """Per task: (model, batch-1 median ms) of the largest model's PyTorch fp32 form."""
    out: dict[str, tuple[str, float]] = {}
    sized: dict[str, int] = {}
    for row in rows:
        if row.form == "pytorch-fp32" and row.median_ms and (row.parameters or 0) >= sized.get(row.task, -1):
            sized[row.task] = row.parameters or 0
            out[row.task] = (row.model, row.median_ms)
    return out


def render_export_table(runs: list[Any], experiment: str, console: Any) -> bool:
    """Prints the table; False when the experiment has no export runs."""
    from rich.table import Table

    rows = form_rows(runs)
    if not rows:
        return False
    reference = reference_latency(rows)
    table = Table(title=f"experiment {experiment}: deployment forms on CPU (Table 3 where students run)")
    for column in ("model", "task", "form", "params", "size MB", "score", "drop", "batch 1 median ms",
                   "batch 1 p95 ms", "examples/s (batched)", "speed-up (batch 1)", "threads"):
        table.add_column(column, justify="left" if column in ("model", "task", "form") else "right")

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for row in sorted(rows, key=lambda r: (r.task, -(r.parameters or 0), r.model, FORMS.index(r.form))):
        ref = reference.get(row.task)
        speed = f"{ref[1] / row.median_ms:.2f}x" if ref and row.median_ms else "-"
        table.add_row(row.model, row.task, row.form, num(row.parameters / 1e6 if row.parameters else None, ".1f") + "M",
                      num(row.size_bytes / 1e6 if row.size_bytes else None, ".1f"),
                      num(100 * row.score if row.score is not None else None, ".2f"),
                      num(row.drop, "+.2f"), num(row.median_ms, ".2f"), num(row.p95_ms, ".2f"),
                      num(row.throughput, ".1f"), speed, row.threads)
    console.print(table)
    refs = "; ".join(f"{task}: {model}" for task, (model, _) in sorted(reference.items()))
    console.print(f"score x 100 on the dev set given to distil export; drop: points below the model's PyTorch fp32 "
                  f"form; speed-up against the largest model's PyTorch fp32 form at batch 1 ({refs}); timing "
                  "excludes tokenisation")
    return True
