"""Loss-curve and run-comparison PNGs (matplotlib, no display needed).

`write_loss_curves(run_dir)` turns the run folder's metrics.jsonl into <run_dir>/plots/loss_curves.png; the
MLflow tracker calls it when a run ends and logs the PNG under the run's `plots/` artifacts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

Series = tuple[Sequence[float], Sequence[float]]  # (steps, values)
LOSS_CURVES_NAME = "loss_curves.png"


def read_metrics_jsonl(path: str | Path) -> dict[str, Series]:
    """metrics.jsonl ({"step": n, name: value, ...} per line) -> {name: (steps, values)}; torn lines skipped."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        step = record.pop("step", None)
        if not isinstance(step, int | float):
            continue
        for name, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                steps, values = series.setdefault(name, ([], []))
                steps.append(step)
                values.append(float(value))
    return series


NOT_LOSSES = {"loss_scale"}  # fp16's dynamic loss scale is logged beside the losses, but is not one


def is_loss(name: str) -> bool:
    """`loss` and its components (`loss_kl`, `loss/ce`, ...), not `loss_scale`."""
    return name.startswith("loss") and name not in NOT_LOSSES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(series: Mapping[str, Series], path: str | Path, title: str = "") -> Path | None:
    """Losses (total and each component) against step, with the learning rate below when logged."""
    losses = {k: v for k, v in sorted(series.items()) if is_loss(k) and v[0]}
    if not losses:
        return None
    plt = _pyplot()
    has_lr = bool(series.get("lr", ((), ()))[0])
    fig, axes = plt.subplots(2 if has_lr else 1, 1, figsize=(8, 6 if has_lr else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    for name, (steps, values) in losses.items():
        ax.plot(steps, values, label=name, linewidth=2.0 if name == "loss" else 1.2)
    ax.set_ylabel("loss")
    if all(v > 0 for _, values in losses.values() for v in values if math.isfinite(v)):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "training losses")
    if has_lr:
        lr_ax = axes[1][0]
        lr_ax.plot(*series["lr"], color="gray")
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(True, alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    return _save(plt, fig, path)


def write_loss_curves(run_dir: str | Path) -> Path | None:
    """<run_dir>/metrics.jsonl -> <run_dir>/plots/loss_curves.png (None when there is nothing to plot)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    return plot_loss_curves(read_metrics_jsonl(metrics), Path(run_dir) / "plots" / LOSS_CURVES_NAME,
                            title=f"training losses: {Path(run_dir).name}")


def plot_run_comparison(curves: Mapping[str, Series], bars: Mapping[str, Mapping[str, float]],
                        path: str | Path, title: str = "") -> Path:
    """Left: each run's total loss against step. Right: one bar chart per figure in `bars` (e.g. tokens/s)."""
    plt = _pyplot()
    panels = 1 + len(bars)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("total loss")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    for i, (figure, per_run) in enumerate(bars.items(), start=1):
        bar_ax = axes[0][i]
        labels = list(per_run)
        bar_ax.bar(range(len(labels)), [per_run[k] for k in labels], color="tab:blue")
        bar_ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        bar_ax.set_title(figure)
        bar_ax.grid(True, axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
