"""Training metrics: the window of sums between two log lines, its reduction over ranks, and the sink
(progress bar, metrics.jsonl in the run folder, the tracker) that rank 0 writes each line to.

metrics.jsonl holds each logged step once: a run that starts at step S (a resume from the checkpoint of
step S, or 0 for a fresh start) first drops the lines of steps after S, written by an attempt that crashed
or was stopped after its last checkpoint, since the steps are trained (and logged) again.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distil.common.files import atomic_write_text

log = logging.getLogger("distil.train")


@dataclass
class WindowTotals:
    """A window summed over all ranks: mean loss parts per micro-step, counts, and the seconds it took."""

    losses: dict[str, float]
    micro_steps: float
    sequences: float
    tokens: float
    masked: float
    flops: float
    seconds: float


@dataclass
class Window:
    """Sums over the micro-steps since the last log line (this rank). Loss parts stay tensors on the
    device, so logging costs no synchronisation until the log step."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    micro_steps: int = 0
    sequences: int = 0
    tokens: int = 0
    masked: int = 0
    flops: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, parts: dict[str, torch.Tensor], sequences: int, tokens: int, masked: int, flops: float) -> None:
        for k, v in parts.items():
            v = v.detach().double()
            self.parts[k] = self.parts[k] + v if k in self.parts else v
        self.micro_steps += 1
        self.sequences += sequences
        self.tokens += tokens
        self.masked += masked
        self.flops += flops

    def reduce(self, device: torch.device, world_size: int) -> WindowTotals:
        """Sums the window over ranks in one all-reduce (every rank calls this at the same step)."""
        keys = sorted(self.parts)
        counts = torch.tensor([self.micro_steps, self.sequences, self.tokens, self.masked, self.flops],
                              dtype=torch.float64, device=device)
        vec = torch.cat([torch.stack([self.parts[k] for k in keys]).to(device), counts])
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        vals = vec.tolist()
        micro, seqs, tokens, masked, flops = vals[len(keys):]
        seconds = max(time.perf_counter() - self.started, 1e-9)
        losses = {k: vals[i] / max(micro, 1) for i, k in enumerate(keys)}
        return WindowTotals(losses, micro, seqs, tokens, masked, flops, seconds)


def drop_lines_after(path: Path, step: int) -> int:
    """Rewrites metrics.jsonl (atomically) without its lines of steps after `step`; returns how many went.
    A torn last line (a crash mid-write) goes too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            line_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if line_step > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


class MetricsSink:
    """Rank 0: a tqdm bar, metrics.jsonl in the run folder, and the tracker. Lines of steps after `initial`
    (the step this run starts from) are dropped first: they are about to be logged again."""

    def __init__(self, run_dir: Path, tracker: Any, total_steps: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.tracker = tracker
        self.bar = None
        self.file = None
        if enabled:
            from tqdm.auto import tqdm

            # On a terminal a live bar; in a log file (batch jobs) one line per logged step instead.
            self.bar = tqdm(total=total_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            disable=not sys.stderr.isatty())
            path = run_dir / "metrics.jsonl"
            dropped = drop_lines_after(path, initial)
            if dropped:
                log.info("metrics.jsonl: dropped %d line(s) after step %d (logged again by this run)", dropped,
                         initial)
            self.file = path.open("a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        assert self.file is not None and self.bar is not None
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        if self.bar.disable:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("loss") or k in
                             ("lr", "grad_norm", "tokens_per_s", "mfu"))
            print(f"step {step}: {shown}", file=sys.stderr, flush=True)
        self.tracker.log_metrics(metrics, step=step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
