"""Elastic resume: a checkpoint written by W processes resumes on W' (2 -> 1 with ZeRO-2, 1 -> 2 with ZeRO-1).

The data layout is global (one batch sequence dealt to the ranks update by update, masks included), the
global batch is kept by the accumulation (engine.gradient_accumulation_steps set from the checkpoint), and
DeepSpeed re-partitions the optimizer state through its universal checkpoint (a global batch the new
number of processes cannot share is one error line). So the resumed runs end
with the weights of the run that never changed size, within fp32 tolerance (the sums over ranks and over
micro-steps round differently), having trained on as many sequences; and 1 process x accumulation 2 reaches
the weights of 2 processes x accumulation 1 (gradient averaging). Dropout is off so that the weights are
comparable; MLM mode needs no teacher.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cluster_helpers import TINY_MLM, finish_ranks, latest_step, metric_steps, run, start_ranks, train_cmd
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS, STOP = 12, 5


def args(shards, out, *extra: str) -> list[str]:
    return [*TINY_MLM, f"data.shards={shards}", f"run.output_dir={out}", f"run.max_steps={STEPS}", "run.log_every=1",
            f"checkpoint.every={STOP}", "checkpoint.keep=5", "model.hidden_dropout_prob=0",
            "model.attention_probs_dropout_prob=0", *extra]


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, f"{what}: weights differ by up to {worst}"


def module_at(run_dir, step: int) -> dict[str, torch.Tensor]:
    from distil.pretrain.checkpoint.manager import weights_only_torch_load

    with weights_only_torch_load():
        state = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
                           map_location="cpu")
    return {k: v for k, v in state["module"].items()}


def used_universal_checkpoint(run_dir, log: str, world: int) -> None:
    """DeepSpeed's universal form of the checkpoint was made, complete, and loaded (not the ZeRO files as
    they were, which DeepSpeed refuses for another data-parallel size)."""
    universal = run_dir / "checkpoints" / ".universal" / f"step_{STOP:08d}"
    assert (universal / "COMPLETE").is_file(), sorted(p.name for p in universal.parent.glob("*"))
    assert list((universal / "zero").glob("*/fp32.pt")), "no per-parameter fp32 state in the universal form"
    assert json.loads((run_dir / "ds_config.json").read_text())["checkpoint"]["load_universal"] is True
    assert f"re-partitioned for {world} process(es) from DeepSpeed's universal checkpoint {universal}" in log, log[-3000:]


def samples(run_dir) -> int:
    path = run_dir / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json"
    return json.loads(path.read_text())["counters"]["samples"]


def test_resume_on_another_number_of_processes(shards, tmp_path):
    reference = tmp_path / "reference"  # 2 processes x accumulation 1, ZeRO-2, never stopped
    finish_ranks(start_ranks(args(shards, reference, "engine.gradient_accumulation_steps=1"), 2))
    expected = load_file(reference / "export" / "model.safetensors")
    at_stop, at_end = module_at(reference, STOP), module_at(reference, STEPS)
    moved = max(float((at_stop[k] - at_end[k]).abs().max()) for k in at_stop)
    assert moved > 1e-3  # the steps after the checkpoint change the weights far beyond the tolerance

    # 2 -> 1 (ZeRO-2): the reference's checkpoint of step STOP, as a preempted 2-process run leaves it
    shrunk = tmp_path / "shrunk"
    (shrunk / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / f"step_{STOP:08d}", shrunk / "checkpoints" / f"step_{STOP:08d}")
    (shrunk / "checkpoints" / "latest").write_text(f"step_{STOP:08d}\n")
    p = run(train_cmd(*args(shards, shrunk, "engine.gradient_accumulation_steps=1"), "--resume", "auto"))
    assert "engine.gradient_accumulation_steps 1 -> 2 keeps the global batch" in p.stderr, p.stderr[-3000:]
    used_universal_checkpoint(shrunk, p.stderr, 1)
    close(load_file(shrunk / "export" / "model.safetensors"), expected, "2 -> 1 processes")
    assert samples(shrunk) == samples(reference)

    # 1 -> 2 (ZeRO-1): 1 process x accumulation 2 for STOP steps, then 2 processes
    grown = tmp_path / "grown"
    one = args(shards, grown, "engine.gradient_accumulation_steps=2", "engine.zero_stage=1")
    run(train_cmd(*one, f"run.stop_after_steps={STOP}"), expect=3)
    assert latest_step(grown) == STOP
    close(module_at(grown, STOP), module_at(reference, STOP), "1 process x accumulation 2 vs 2 x 1")
    # 3 processes cannot share an update of 2 micro-batches: rank 0 of such a launch stops before any work
    p = run(train_cmd(*one, "--resume", "auto"), expect=2, RANK="0", LOCAL_RANK="0", WORLD_SIZE="3")
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 micro-batches per update, which 3 processes cannot share" in errors[0], p.stderr
    used_universal_checkpoint(grown, finish_ranks(start_ranks([*one, "--resume", "auto"], 2)), 2)
    close(load_file(grown / "export" / "model.safetensors"), expected, "1 -> 2 processes")
    assert samples(grown) == samples(reference)
    assert metric_steps(grown) == list(range(1, STEPS + 1))
