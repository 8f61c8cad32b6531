"""`distil train`: distil a BERT teacher into a DistilBERT student (or pretrain a BERT in MLM mode).

    distil train --config configs/tiny_cpu.yaml run.max_steps=100 data.batch_size=8 [--resume auto]
    deepspeed --num_gpus 8 -m distil.pretrain.train --config configs/distilbert_base_uncased.yaml
    torchrun --nproc_per_node 8 -m distil.pretrain.train --config ...

The DeepSpeed launcher adds `--local_rank=N`; it is accepted and ignored (LOCAL_RANK in the environment is
what counts). Every rank parses the same config, so a config error stops all of them before any work.

Exit statuses (docs/cluster.md): 0 finished (or `--resume` of a run that had finished: nothing done);
1 failed (non-finite losses, a collective timed out, a bug); 2 bad input; 3 stopped with a checkpoint at
run.time_limit_minutes / run.stop_after_steps, more to do; 75 run.output_dir in use by a live run, nothing
touched; 128+N stopped by signal N with a checkpoint written.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from distil.common.errors import UserError


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "ignore_unknown_options": False})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="YAML training config (see configs/).")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="Continue from the latest complete checkpoint in the run's checkpoint folder (auto) or from PATH.")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher; LOCAL_RANK is used instead.")
@click.argument("overrides", nargs=-1)
def train(config_path: str, resume: str | None, local_rank: int | None, overrides: tuple[str, ...]) -> None:
    """Train with a YAML config plus key=value overrides (e.g. run.max_steps=100 loss.alpha_cos=0).

    Config keys, launchers (deepspeed, torchrun, SLURM) and outputs: docs/training.md.
    """
    from distil.pretrain.run import stopsignal, supervisor

    stopsignal.install()  # before anything heavy: a signal during set-up is kept, not fatal
    supervisor.announce_ready()  # a launch script's supervisor passes its stop signals on from now on
    status = 1  # an exception escaping below
    try:
        _train(config_path, resume, local_rank, overrides)
        status = 0
    except SystemExit as e:
        status = supervisor.exit_status(e.code)
        raise
    finally:
        supervisor.report_exit(status)


def _train(config_path: str, resume: str | None, local_rank: int | None, overrides: tuple[str, ...]) -> None:
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    logging.basicConfig(level=logging.INFO if _is_rank0() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from distil.pretrain.config import load_config

        cfg = load_config(config_path, list(overrides))
        from distil.pretrain.run.lifecycle import (
            EXIT_FAILED,
            EXIT_LOCKED,
            CollectiveTimeout,
            NonFiniteLossError,
        )
        from distil.pretrain.run.lock import RunLocked
        from distil.pretrain.trainer import run_training

        try:
            result = run_training(cfg, resume)
        except NonFiniteLossError as e:
            if _is_rank0():
                click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_FAILED)
        except CollectiveTimeout as e:
            click.echo(f"error: {e}", err=True)  # every live rank: rank 0 may be the one that went silent
            _exit_now(EXIT_FAILED)
        except RunLocked as e:
            if _is_rank0():
                click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_LOCKED)
        if result.export_dir is not None:
            click.echo(f"exported to {result.export_dir}")
        if result.status == "DONE" and _is_rank0():
            click.echo(f"{cfg.run.output_dir} has already finished; nothing to do", err=True)
        if result.status in ("KILLED", "STOPPED") and _is_rank0():
            click.echo("stopped early with a checkpoint written; continue with --resume auto", err=True)
        if result.exit_status:
            sys.exit(result.exit_status)  # 128+N for signal N, as a process ended by that signal
    except UserError as e:
        if _is_rank0():
            click.echo(f"error: {e}", err=True)
        sys.exit(2)
    finally:
        _shutdown()


def _exit_now(status: int) -> None:
    """Exit without tearing down a process group whose peer hangs (that teardown could wait on it)."""
    from distil.pretrain.run import supervisor

    supervisor.report_exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def _shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # best effort at exit
        pass


if __name__ == "__main__":
    train()
