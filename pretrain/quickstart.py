"""`distil quickstart`: the whole pipeline, offline, on a sample corpus, as a user would run it.

sample corpus (stdlib docstrings) -> `distil prepare` (trains a WordPiece tokenizer) -> `distil train` in MLM
mode (a small BERT teacher) -> `distil train` in distillation mode (its DistilBERT student) -> `distil evaluate`
of both on the held-out split -> `distil finetune` of both on a small labelled task made from the corpus ->
`distil review` of the MLflow runs (with the GLUE-style table). Each stage is the real CLI in a subprocess, so what works here works by hand.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from distil.common.errors import UserError


def _run(stage: str, args: list[str]) -> None:
    click.secho(f"\n== {stage}: distil {' '.join(args)}", bold=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-P", "-m", "distil.pretrain.cli", *args])  # -P: see launch/local.sh
    if result.returncode != 0:
        raise UserError(f"quickstart stage '{stage}' failed (exit {result.returncode}); see the output above")
    click.echo(f"== {stage} done in {time.perf_counter() - started:.0f} s")


def experiment_link(store: str, experiment: str) -> str:
    """The experiment's page in the MLflow UI's model-training view, with the command that serves the store."""
    import mlflow

    from distil.pretrain.tracking.links import describe_link, serve_command
    from distil.pretrain.tracking.transport import configure_http_client

    configure_http_client(timeout_s=20)
    found = mlflow.MlflowClient(tracking_uri=store).get_experiment_by_name(experiment)
    return describe_link(store, found.experiment_id) if found else str(serve_command(store))


def _finetune_stage(corpus: Path, out: Path, teacher: Path, student: Path) -> None:
    """Teacher and student fine-tuned on a small labelled task made from the sample corpus (is this sentence
    the opening sentence of its paragraph?), so that review shows the GLUE-style table."""
    from distil.pretrain.finetune.sample_task import write_opening_sentence_task

    task = write_opening_sentence_task(corpus, out / "task", n_train=1200, n_dev=300)
    click.echo(f"\nsample task: is this sentence the opening sentence of its paragraph? ({task['train']}, "
               f"{task['dev']})")
    common = ["--task", "custom", "--train", str(task["train"]), "--dev", str(task["dev"]), "--seeds", "1",
              "--epochs", "3", "--lr", "5e-4", "--batch-size", "16", "--max-seq-len", "48", "--experiment",
              "quickstart", "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "warmup_ratio=0.1",
              "inference_max_examples=100"]
    _run("fine-tune teacher", ["finetune", "--model", str(teacher), "--output", str(out / "finetune" / "teacher"),
                               *common])
    _run("fine-tune student", ["finetune", "--model", str(student), "--teacher", str(teacher), "--output",
                               str(out / "finetune" / "student"), *common])


STAGES = ("prepare", "teacher", "student", "evaluate", "finetune", "review")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--output", "output", type=click.Path(file_okay=False), default="quickstart", show_default=True,
              help="Folder for the corpus, shards, runs and the MLflow store.")
@click.option("--vocab-size", type=int, default=4000, show_default=True, help="WordPiece vocabulary to train.")
@click.option("--teacher-steps", type=int, default=300, show_default=True)
@click.option("--student-steps", type=int, default=200, show_default=True)
@click.option("--corpus-mb", type=float, default=3.0, show_default=True, help="Size of the sample corpus.")
@click.option("--overwrite", is_flag=True, help="Start over in an --output folder that holds a previous quickstart.")
@click.option("--stop-after", type=click.Choice(STAGES[:-1]), default=None,
              help="End after this stage (e.g. teacher: shards and a pretrained teacher only).")
def quickstart(output: str, vocab_size: int, teacher_steps: int, student_steps: int, corpus_mb: float,
               overwrite: bool, stop_after: str | None) -> None:
    """Sample corpus -> shards -> MLM teacher -> distilled student -> evaluation -> fine-tuning -> review,
    offline on CPU."""
    from distil.data_pipeline.prepare.sample_corpus import write_sample_corpus

    out = Path(output).resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} already holds a quickstart; pass --overwrite or choose another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tracking = [f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}"]

    corpus = out / "corpus.txt"
    paragraphs = write_sample_corpus(corpus, max_bytes=int(corpus_mb * 1_000_000))
    click.echo(f"sample corpus: {corpus} ({paragraphs} paragraphs, {corpus.stat().st_size / 1e6:.1f} MB "
               "of standard-library docstrings)")

    def ends_after(stage: str) -> bool:
        if stop_after == stage:
            click.secho(f"\nquickstart stopped after its {stage} stage (--stop-after); everything is in {out}",
                        fg="green")
        return stop_after == stage

    shards = out / "shards"
    _run("prepare", ["prepare", "--input", str(corpus), "--output", str(shards), "--train-tokenizer",
                     str(vocab_size), "--max-seq-len", "128", "--holdout-fraction", "0.02", "--pack"])
    if ends_after("prepare"):
        return
    teacher_dir = out / "teacher"
    _run("teacher (MLM)", ["train", "--config", "quickstart_teacher",
                           f"data.shards={shards}", f"run.output_dir={teacher_dir}",
                           f"run.max_steps={teacher_steps}", *tracking])
    if ends_after("teacher"):
        return
    student_dir = out / "student"
    _run("student (distillation)", ["train", "--config", "quickstart_student",
                                    f"data.shards={shards}", f"teacher.path={teacher_dir / 'export'}",
                                    f"run.output_dir={student_dir}", f"run.max_steps={student_steps}",
                                    *tracking])
    if ends_after("student"):
        return
    _run("evaluate", ["evaluate", "--model", str(student_dir / "export"), "--teacher", str(teacher_dir / "export"),
                      "--shards", str(shards), "--max-batches", "20", "--mask-smoothing", "0",
                      "--output", str(out / "eval_report.json"),
                      "--experiment", "quickstart", "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"])
    if ends_after("evaluate"):
        return
    _finetune_stage(corpus, out, teacher_dir / "export", student_dir / "export")
    if ends_after("finetune"):
        return
    _run("review", ["review", "--experiment", "quickstart", "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}",
                    "--output", str(out / "comparison.png")])
    click.secho(f"\nquickstart complete: student in {student_dir / 'export'}, runs in {out / 'mlflow.db'}",
                fg="green")
    store = f"sqlite:///{out / 'mlflow.db'}"
    click.echo(f"browse the runs: {experiment_link(store, 'quickstart')}")
