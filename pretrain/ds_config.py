"""The DeepSpeed config: the ds_config JSON with every "auto" filled from the training config, and the
optimizer's parameter groups.

The training config is the single source: a concrete JSON value that disagrees with it is a UserError.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from distil.common import assets
from distil.common.errors import UserError
from distil.pretrain.config import TrainConfig, warmup_steps


def resolve_ds_config_path(path: str) -> Path:
    return assets.ds_config_path(path)


def fill_auto(section: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Fill an "auto" (or absent) field; a concrete value that disagrees with the training config is an error."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
        return
    same = (list(current) == list(value)) if isinstance(value, list | tuple) else current == value
    if isinstance(value, float) and isinstance(current, int | float):
        same = math.isclose(float(current), value, rel_tol=1e-9, abs_tol=0.0)
    if not same:
        raise UserError(f"DeepSpeed config sets {where}.{key}={current!r} but the training config gives {value!r}: "
                        f"set it to \"auto\" in the JSON (the training config is the single source)")


def build_ds_config(cfg: TrainConfig, total_steps: int, world_size: int) -> dict[str, Any]:
    """The ds_config JSON with every "auto" filled from the training config (and checked where concrete)."""
    path = resolve_ds_config_path(cfg.engine.ds_config)
    try:
        ds: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"engine.ds_config {path} is not valid JSON: {e}") from None
    accum = cfg.engine.gradient_accumulation_steps
    micro = cfg.data.batch_size if cfg.data.batch_size is not None else 1  # token-budget batches vary
    fill_auto(ds, "train_micro_batch_size_per_gpu", micro, "ds_config")
    fill_auto(ds, "gradient_accumulation_steps", accum, "ds_config")
    fill_auto(ds, "train_batch_size", micro * accum * world_size, "ds_config")
    fill_auto(ds, "gradient_clipping", cfg.optim.max_grad_norm, "ds_config")
    _fill_optimizer(ds, cfg, path)
    _fill_scheduler(ds, cfg, path, total_steps)
    precision = cfg.engine.precision
    check_precision_supported(precision)
    ds.setdefault("fp16", {})
    ds.setdefault("bf16", {})
    fill_auto(ds["fp16"], "enabled", precision == "fp16", "fp16")
    fill_auto(ds["bf16"], "enabled", precision == "bf16", "bf16")
    zero = ds.setdefault("zero_optimization", {})
    fill_auto(zero, "stage", cfg.engine.zero_stage, "zero_optimization")
    ds.setdefault("steps_per_print", 10**9)
    return ds


def check_precision_supported(precision: str) -> None:
    """DeepSpeed refuses a precision its accelerator lacks with a traceback deep in engine set-up; say it
    here in one line (DeepSpeed's CPU accelerator, for one, has no fp16)."""
    if precision not in ("fp16", "bf16"):
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = accelerator.is_fp16_supported() if precision == "fp16" else accelerator.is_bf16_supported()
    if not supported:
        other = "bf16 or fp32" if precision == "fp16" else "fp16 or fp32"
        raise UserError(f"engine.precision={precision} is not supported by DeepSpeed's "
                        f"{accelerator.device_name()} accelerator: use {other} here, or run on a GPU")


def _fill_optimizer(ds: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise UserError(f"{path}: optimizer.type {opt.get('type')!r} is not supported; use AdamW")
    params = opt.setdefault("params", {})
    fill_auto(params, "lr", cfg.optim.lr, "optimizer.params")
    fill_auto(params, "betas", list(cfg.optim.betas), "optimizer.params")
    fill_auto(params, "eps", cfg.optim.eps, "optimizer.params")
    fill_auto(params, "weight_decay", cfg.optim.weight_decay, "optimizer.params")


def _fill_scheduler(ds: dict[str, Any], cfg: TrainConfig, path: Path, total_steps: int) -> None:
    sched = ds.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {}})
    if sched.get("type") != "WarmupDecayLR":
        raise UserError(f"{path}: scheduler.type must be WarmupDecayLR (linear warm-up then linear decay)")
    sp = sched.setdefault("params", {})
    sp.setdefault("warmup_type", "linear")
    sp.setdefault("warmup_min_lr", 0.0)
    fill_auto(sp, "warmup_max_lr", cfg.optim.lr, "scheduler.params")
    # DeepSpeed requires at least one warm-up step (its lr is 0 at step 0 either way).
    fill_auto(sp, "warmup_num_steps", max(1, warmup_steps(cfg, total_steps)), "scheduler.params")
    fill_auto(sp, "total_num_steps", total_steps, "scheduler.params")


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and norm weights (as the recipe; every 1-D parameter, so that the
    norms of every family, named LayerNorm, layer_norm or norm, are covered)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias") or p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
