"""`distil review`'s GLUE view: the fine-tuning parent runs of an experiment (mode=finetune, one per model and
task, holding the medians over seeds) as the paper's Table 1 and Table 3, and a grouped bar plot.

Table 1: a row per model (teachers first, each followed by its students), a column per task (its score: the
mean of GLUE's metrics for it, x 100) and the macro score (mean over the row's tasks); under each student,
its scores as a percentage of its teacher's (the macro percentage over the tasks both have).
Table 3: parameters and the inference time of a full pass over one task's dev set (STS-B when every model
has it, as the paper; else the task most models have), and both as a percentage of the teacher's; times are
compared only when measured on the same device, batch size and thread count.

A student's teacher is the `--teacher` given to `distil finetune`, else the `teacher.path` of the distil
training run that exported the model (matched by `<run.output_dir>/export`), when it is in the experiment.
A model fine-tuned with `--distill-from` (the paper's "(D)" step) is a row of its own, named "<model> (D)",
under the same teacher. The latest finished parent run of a model, task and kind wins.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distil.common.formatting import fmt_count
from distil.pretrain.finetune.tasks import GLUE_ORDER

FINETUNE_MODES = ("finetune", "finetune-seed")
TABLE3_TASK = "stsb"  # the paper's Table 3 times a pass over STS-B's dev set
# the paper's Table 2 (and token tagging beside it): their own table, not in Table 1's macro
TABLE2_TASKS = ("imdb", "squad", "squad_v2", "conll")
TABLE2_HEADS = {"imdb": "IMDb acc.", "squad": "SQuAD EM/F1", "squad_v2": "SQuAD 2.0 EM/F1", "conll": "CoNLL F1"}
TABLE2_METRICS = {"imdb": ("dev_accuracy",), "squad": ("dev_exact", "dev_f1"), "squad_v2": ("dev_exact", "dev_f1"),
                  "conll": ("dev_f1",)}


def is_finetune_run(run: Any) -> bool:
    return run.data.params.get("mode") in FINETUNE_MODES


@dataclass
class Inference:
    seconds: float
    examples: int
    batch_size: int
    device: str
    threads: str

    @property
    def setting(self) -> tuple[str, int, str]:
        return (self.device, self.batch_size, self.threads)


@dataclass
class GlueRow:
    path: str  # resolved model folder (+ " (D)" when fine-tuned with --distill-from): the row's identity
    name: str
    model_type: str
    teacher: str = ""  # resolved teacher folder, "" when unknown
    role: str = "model"
    num_parameters: int | None = None
    scores: dict[str, float] = field(default_factory=dict)  # task -> score (fraction)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> dev_* medians
    seeds: dict[str, int] = field(default_factory=dict)
    inference: dict[str, Inference] = field(default_factory=dict)

    @property
    def glue_scores(self) -> dict[str, float]:
        return {t: v for t, v in self.scores.items() if t not in TABLE2_TASKS}

    @property
    def macro(self) -> float | None:
        scores = self.glue_scores
        return statistics.fmean(scores.values()) if scores else None


def _resolved(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def search_parents(client: Any, experiment_id: str, filter_string: str | None, max_runs: int = 5000) -> list[Any]:
    clauses = ["params.mode = 'finetune'", "attributes.status = 'FINISHED'"]
    if filter_string:
        clauses.append(filter_string)
    return client.search_runs([experiment_id], filter_string=" and ".join(clauses), max_results=max_runs,
                              order_by=["attributes.start_time ASC"])


def training_teachers(client: Any, experiment_id: str) -> tuple[dict[str, str], set[str]]:
    """From distil's training runs: exported student -> its teacher, and the exported MLM teachers."""
    students, teachers = {}, set()
    runs = [run for mode in ("distill", "mlm")  # MLflow's filters have no "or"
            for run in client.search_runs([experiment_id], filter_string=f"params.mode = '{mode}'", max_results=5000)]
    for run in runs:
        params = run.data.params
        output_dir = params.get("run.output_dir")
        if not output_dir:
            continue
        export = _resolved(str(Path(output_dir) / "export"))
        if params["mode"] == "mlm":
            teachers.add(export)
        elif params.get("teacher.path"):
            students[export] = _resolved(params["teacher.path"])
    return students, teachers


def build_rows(parents: list[Any], distilled_from: dict[str, str], mlm_teachers: set[str]) -> list[GlueRow]:
    rows: dict[str, GlueRow] = {}
    for run in parents:  # oldest first: a later run of the same model and task replaces the earlier one
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        path = _resolved(params.get("finetune.model", ""))
        task = params.get("finetune.task")
        if not path or not task or "dev_score" not in metrics:
            continue
        distilled = bool(params.get("finetune.distill_from"))  # the (D) step: its own row beside the plain one
        key = f"{path} (D)" if distilled else path
        row = rows.setdefault(key, GlueRow(path=key, name=params.get("finetune.name") or Path(path).name + (
            " (D)" if distilled else ""), model_type=params.get("finetune.model_type", "")))
        row.name = params.get("finetune.name") or row.name
        teacher = _resolved(params.get("finetune.teacher", "")) or distilled_from.get(path, "")
        row.teacher = teacher or row.teacher
        if "num_parameters" in metrics:
            row.num_parameters = int(metrics["num_parameters"])
        row.scores[task] = metrics["dev_score"]
        row.metrics[task] = {k: v for k, v in metrics.items() if k.startswith("dev_")}
        seeds = params.get("finetune.seeds")
        if seeds and seeds.isdigit():
            row.seeds[task] = int(seeds)
        if "inference_seconds" in metrics:
            row.inference[task] = Inference(metrics["inference_seconds"], int(metrics.get("inference_examples", 0)),
                                            int(metrics.get("inference_batch_size", 0)),
                                            tags.get("distil.finetune.inference_device", "?"),
                                            tags.get("distil.finetune.torch_threads", "?"))
    teachers = {r.teacher for r in rows.values() if r.teacher} | mlm_teachers
    for row in rows.values():
        if row.path in teachers:
            row.role = "teacher"
        elif row.teacher:
            row.role = "student"
    return ordered(list(rows.values()))


def ordered(rows: list[GlueRow]) -> list[GlueRow]:
    """Teachers (by name), each followed by its students (by macro score, best first); the rest after."""
    by_path = {r.path: r for r in rows}
    out: list[GlueRow] = []
    for teacher in sorted((r for r in rows if r.role == "teacher"), key=lambda r: r.name):
        out.append(teacher)
        out += sorted((r for r in rows if r.role == "student" and r.teacher == teacher.path),
                      key=lambda r: -(r.macro or 0))
    out += [r for r in rows if r not in out and (r.role != "student" or r.teacher not in by_path)]
    return out


def teacher_of(row: GlueRow, rows: list[GlueRow]) -> GlueRow | None:
    if row.role != "student":
        return None
    return next((r for r in rows if r.path == row.teacher), None)


def relative_scores(student: GlueRow, teacher: GlueRow) -> tuple[dict[str, float], float | None]:
    """Per task and macro: the student's score as % of the teacher's (macro over the tasks both have)."""
    shared = [t for t in student.glue_scores if t in teacher.glue_scores]
    per_task = {t: 100 * student.scores[t] / teacher.scores[t] for t in shared if teacher.scores[t] > 0}
    if not shared:
        return per_task, None
    t_macro = statistics.fmean(teacher.scores[t] for t in shared)
    s_macro = statistics.fmean(student.scores[t] for t in shared)
    return per_task, (100 * s_macro / t_macro if t_macro > 0 else None)


def task_columns(rows: list[GlueRow]) -> list[str]:
    present = {t for r in rows for t in r.glue_scores}
    return [t for t in GLUE_ORDER if t in present] + sorted(present - set(GLUE_ORDER))


def render_glue_table(rows: list[GlueRow], title: str, console: Any) -> None:
    from rich.table import Table

    tasks = task_columns(rows)
    table = Table(title=title, header_style="bold")
    for column in ("model", "role", "params", "macro", *tasks):
        table.add_column(column, justify="left" if column in ("model", "role") else "right", no_wrap=True)
    for row in rows:
        cells = [f"{100 * row.scores[t]:.1f}" if t in row.scores else "-" for t in tasks]
        table.add_row(row.name, row.role, fmt_count(row.num_parameters),
                      f"{100 * row.macro:.1f}" if row.macro is not None else "-", *cells)
        teacher = teacher_of(row, rows)
        if teacher is not None:
            per_task, macro = relative_scores(row, teacher)
            table.add_row(f"  % of {teacher.name}", "", "", f"{macro:.1f}%" if macro is not None else "-",
                          *[f"{per_task[t]:.1f}%" if t in per_task else "-" for t in tasks], style="italic")
    console.print(table)
    console.print("scores x 100, median over seeds; a task's score is the mean of GLUE's metrics for it (CoLA: "
                  "Matthews corr.; MRPC, QQP: F1 and accuracy; STS-B: Pearson and Spearman; MNLI: matched "
                  "accuracy; others: accuracy); macro: mean over the row's tasks", soft_wrap=True)


def table2_cell(row: GlueRow, task: str) -> str:
    metrics = row.metrics.get(task)
    if not metrics:
        return "-"
    return "/".join(f"{100 * metrics[k]:.2f}" if task == "imdb" else f"{100 * metrics[k]:.1f}"
                    for k in TABLE2_METRICS[task])


def render_table2(rows: list[GlueRow], title: str, console: Any) -> bool:
    """The paper's Table 2: IMDb accuracy and SQuAD EM/F1 per model (a "(D)" student as its own row), with
    parameters and each task's dev-pass time, and under each student both as a percentage of its teacher's."""
    from rich.table import Table

    rows = [r for r in rows if any(t in r.scores for t in TABLE2_TASKS)]
    tasks = [t for t in TABLE2_TASKS if any(t in r.scores for r in rows)]
    if not rows:
        return False
    timed = [t for t in tasks if any(t in r.inference for r in rows)]
    table = Table(title=title, header_style="bold")
    for column in ("model", "role", "params", *(TABLE2_HEADS[t] for t in tasks), *(f"{t} dev pass s" for t in timed)):
        table.add_column(column, justify="left" if column in ("model", "role") else "right", no_wrap=True)
    for row in rows:
        times = [f"{row.inference[t].seconds:.3g}" if t in row.inference else "-" for t in timed]
        table.add_row(row.name, row.role, fmt_count(row.num_parameters), *(table2_cell(row, t) for t in tasks), *times)
        teacher = teacher_of(row, rows)
        if teacher is None:
            continue
        params = (f"{100 * row.num_parameters / teacher.num_parameters:.0f}%"
                  if row.num_parameters and teacher.num_parameters else "-")
        scores = []
        for t in tasks:
            mine, theirs = row.metrics.get(t), teacher.metrics.get(t)
            if not mine or not theirs:
                scores.append("-")
            else:
                scores.append("/".join(f"{100 * mine[k] / theirs[k]:.1f}%" if theirs[k] > 0 else "-"
                                       for k in TABLE2_METRICS[t]))
        ratios = []
        for t in timed:
            mine_t, theirs_t = row.inference.get(t), teacher.inference.get(t)
            ratios.append(f"{100 * mine_t.seconds / theirs_t.seconds:.0f}%" if mine_t and theirs_t
                          and mine_t.setting == theirs_t.setting and theirs_t.seconds > 0 else "-")
        table.add_row(f"  % of {teacher.name}", "", params, *scores, *ratios, style="italic")
    console.print(table)
    console.print("x 100, median over seeds, dev sets; IMDb: accuracy; SQuAD: exact match / F1 (the official "
                  "scripts' normalisation); CoNLL: seqeval's entity F1; \"(D)\": fine-tuned with --distill-from (a "
                  "task teacher); times compared only on the same device, batch size and threads", soft_wrap=True)
    return True


def table3_task(rows: list[GlueRow]) -> str | None:
    timed = [r for r in rows if r.inference]
    if not timed:
        return None
    if all(TABLE3_TASK in r.inference for r in timed):
        return TABLE3_TASK
    counts: dict[str, int] = {}
    for r in timed:
        for t in r.inference:
            counts[t] = counts.get(t, 0) + 1
    return max(sorted(counts), key=lambda t: counts[t])


def render_inference_table(rows: list[GlueRow], console: Any) -> str | None:
    """Table 3: parameters and the time of a full dev pass on one task, and their ratios to the teacher."""
    from rich.table import Table

    task = table3_task(rows)
    if task is None:
        return None
    table = Table(title=f"size and inference time: a full pass over the {task} dev set (Table 3)", header_style="bold")
    for column in ("model", "role", "params", "% of teacher", "examples", "device", "batch", "threads",
                   "seconds", "% of teacher time", "speed-up"):
        table.add_column(column, justify="left" if column in ("model", "role", "device") else "right", no_wrap=True)
    for row in rows:
        timing = row.inference.get(task)
        teacher = teacher_of(row, rows)
        t_timing = teacher.inference.get(task) if teacher is not None else None
        params_pct = (f"{100 * row.num_parameters / teacher.num_parameters:.0f}%"
                      if teacher is not None and row.num_parameters and teacher.num_parameters else "-")
        comparable = timing is not None and t_timing is not None and timing.setting == t_timing.setting
        table.add_row(row.name, row.role, fmt_count(row.num_parameters), params_pct,
                      str(timing.examples) if timing else "-", timing.device if timing else "-",
                      str(timing.batch_size) if timing else "-", timing.threads if timing else "-",
                      f"{timing.seconds:.2f}" if timing else "-",
                      f"{100 * timing.seconds / t_timing.seconds:.0f}%" if comparable else "-",
                      f"{t_timing.seconds / timing.seconds:.2f}x" if comparable and timing.seconds > 0 else "-")
    console.print(table)
    return task


def plot_glue(rows: list[GlueRow], path: Path, title: str) -> Path:
    """Grouped bars: a group per task and the macro score, a bar per model (score x 100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = task_columns(rows) + [t for t in TABLE2_TASKS if any(t in r.scores for r in rows)]
    groups = [*tasks, "macro"]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5))
    for i, row in enumerate(rows):
        values = [100 * row.scores[t] if t in row.scores else 0.0 for t in tasks]
        values.append(100 * row.macro if row.macro is not None else 0.0)
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width=width, label=f"{row.name} ({row.role})")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("dev score x 100 (median over seeds)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def glue_rows(client: Any, experiment_id: str, filter_string: str | None,
              run_ids: tuple[str, ...] = ()) -> list[GlueRow]:
    parents = search_parents(client, experiment_id, filter_string)
    if run_ids:
        parents = [r for r in parents if any(r.info.run_id.startswith(i) for i in run_ids)]
    if not parents:
        return []
    distilled_from, mlm_teachers = training_teachers(client, experiment_id)
    return build_rows(parents, distilled_from, mlm_teachers)


def review_glue(client: Any, experiment: str, experiment_id: str, filter_string: str | None,
                run_ids: tuple[str, ...], plot_path: Path) -> Path | None:
    """Prints Table 1 and Table 3 of the experiment's fine-tunings and writes the plot; None when there are
    no fine-tuning runs."""
    from rich.console import Console

    rows = glue_rows(client, experiment_id, filter_string, run_ids)
    if not rows:
        return None
    console = Console(width=max(160, Console().width))
    glue = [r for r in rows if r.glue_scores]
    if glue:
        render_glue_table(glue, f"experiment {experiment}: GLUE-style fine-tuning (Table 1), {len(glue)} model(s)",
                          console)
        render_inference_table(glue, console)
    render_table2(rows, f"experiment {experiment}: IMDb, SQuAD and CoNLL (Table 2)", console)
    return plot_glue(rows, plot_path, f"experiment {experiment}: fine-tuning dev scores")
