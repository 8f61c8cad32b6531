"""GLUE's metrics from maintained libraries (scikit-learn, scipy), task scores and the median over seeds.

Metrics are fractions (accuracy 0.913, not 91.3); tables multiply by 100 as the paper prints them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

from distil.pretrain.finetune.tasks import TaskSpec


def predictions_from_logits(task: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax) or regression values (the one output)."""
    logits = np.asarray(logits)
    if task.is_regression:
        return logits.reshape(-1).astype(np.float64)
    return logits.argmax(axis=-1)


def _correlation(fn, predictions: np.ndarray, references: np.ndarray) -> float:
    if np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return 0.0  # undefined for a constant input (scipy warns and gives nan): no correlation shown
    return float(fn(predictions, references)[0])


def compute_metrics(task: TaskSpec, predictions: np.ndarray, references: Sequence) -> dict[str, float]:
    """The task's metrics (and extras) plus `score`, the mean of the task's metrics."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    refs = np.asarray(references)
    out: dict[str, float] = {}
    for name in (*task.metrics, *task.extra_metrics):
        if name == "accuracy":
            out[name] = float(accuracy_score(refs, predictions))
        elif name == "f1":
            assert task.labels is not None and task.positive_label is not None
            out[name] = float(f1_score(refs, predictions, pos_label=task.labels.index(task.positive_label),
                                       zero_division=0))
        elif name == "f1_macro":
            out[name] = float(f1_score(refs, predictions, average="macro", zero_division=0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(refs, predictions))
        elif name == "pearson":
            out[name] = _correlation(pearsonr, predictions.astype(np.float64), refs.astype(np.float64))
        elif name == "spearman":
            out[name] = _correlation(spearmanr, predictions.astype(np.float64), refs.astype(np.float64))
        else:  # pragma: no cover - a TaskSpec naming a metric this module lacks is a bug
            raise KeyError(name)
    out["score"] = float(statistics.fmean(out[name] for name in task.metrics))
    return out


def median_metrics(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """The median of every metric over the seeds (the paper's protocol), metric by metric."""
    names = sorted({k for m in per_seed for k in m})
    out = {}
    for name in names:
        values = [m[name] for m in per_seed if name in m and math.isfinite(m[name])]
        if values:
            out[name] = float(statistics.median(values))
    return out


def median_seed(seeds: Sequence[int], scores: Sequence[float]) -> int:
    """The seed whose score is the (lower) median: its test predictions stand for the task."""
    order = sorted(range(len(seeds)), key=lambda i: (scores[i], seeds[i]))
    return seeds[order[(len(order) - 1) // 2]]
