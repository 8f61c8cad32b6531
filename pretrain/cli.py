"""`distil`: one console command, one subcommand per stage.

Subcommands live in the module that owns the stage and are imported only when invoked, so `distil --help`
stays fast (torch, deepspeed and mlflow load only for the commands that need them).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from distil.common.errors import UserError

# name -> (module, attribute, one-line help shown in `distil --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("distil.data_pipeline.prepare.command", "prepare", "Raw text -> tokenised webdataset shards + manifest."),
    "train": ("distil.pretrain.train", "train", "Distil a teacher (BERT, RoBERTa, XLM-R, DistilBERT, ModernBERT) into a student (or pretrain in MLM mode)."),
    "evaluate": ("distil.pretrain.evaluate.command", "evaluate", "Held-out masked-LM metrics of teacher and students, as an MLflow run."),
    "finetune": ("distil.pretrain.finetune.run", "finetune", "Fine-tune on a GLUE task or labelled file (several seeds, median), as MLflow runs."),
    "export": ("distil.pretrain.deploy.command", "export", "A model as ONNX (fp32, int8) checked against PyTorch and timed per form."),
    "review": ("distil.pretrain.evaluate.review", "review", "Compare the MLflow runs of an experiment."),
    "quickstart": ("distil.pretrain.quickstart", "quickstart", "The whole pipeline offline on a sample corpus."),
    "init": ("distil.pretrain.init_files", "init", "Copy the shipped configs, DeepSpeed JSONs and launch scripts out to edit."),
    "tracking-user": ("distil.pretrain.tracking.accounts", "tracking_user", "Accounts on a team's MLflow server (admin)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        if importlib.util.find_spec(module) is None:
            return None
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distil")
def main() -> None:
    """distil: distributed DistilBERT pretraining (teacher BERT -> student DistilBERT)."""


if __name__ == "__main__":
    main()
