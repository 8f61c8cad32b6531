"""What the tracker sends: nested values flattened to dotted keys, keys made valid, secrets redacted, values
truncated to MLflow's limits, metrics reduced to numbers; and the environment tags of a run (git state, GPU
type, library versions)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distil.common.config import flatten

# MLflow's limits (mlflow.utils.validation); imported lazily there, restated here so NullTracker ranks never
# import mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
SECRET_KEY_PATTERN = re.compile(r"(token|secret|passw|api[_-]?key|credential|auth|private[_-]?key)", re.I)
URL_CREDENTIALS_PATTERN = re.compile(r"(?<=://)[^/@\s]+:[^/@\s]+@")
INVALID_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def clean_key(key: str) -> str:
    return INVALID_KEY_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]


def redact_uri(uri: str) -> str:
    """A URI fit for a log line: user:password@ replaced by ***@."""
    return URL_CREDENTIALS_PATTERN.sub("***@", uri)


def clean_value(key: str, value: Any, limit: int) -> str:
    """A value as MLflow stores it: str, secrets redacted, URL credentials stripped, truncated to `limit`."""
    if SECRET_KEY_PATTERN.search(key) and value not in (None, "", False):
        return "***"
    text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    text = redact_uri(text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    return {clean_key(k): clean_value(k, v, MAX_PARAM_VALUE_LENGTH) for k, v in flatten(params).items()}


def clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {clean_key(k): clean_value(k, v, MAX_TAG_VALUE_LENGTH) for k, v in flatten(tags).items()}


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numbers only (tensors with .item() included); anything else is dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool | int | float):
            out[clean_key(key)] = float(value)
    return out


# ----------------------------------------------------------------------------------------------------------
# tags: where the run ran


def environment_tags(world_size: int, num_nodes: int) -> dict[str, str]:
    """Git commit, world size, node count, GPU type and library versions. No environment values."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {"distil.world_size": str(world_size), "distil.num_nodes": str(num_nodes),
            "distil.gpu_type": _gpu_type(), "distil.hostname": socket.gethostname()}
    for package in ("torch", "deepspeed", "transformers", "triton", "mlflow"):
        try:
            tags[f"distil.version.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"distil.version.{package}"] = "not installed"
    commit, dirty = _git_state()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["distil.git_commit"] = commit
        tags["distil.git_dirty"] = str(dirty).lower()
    return tags


def source_tags(source: str) -> dict[str, str]:
    """What MLflow's own runs carry about where they come from: the UI's Source and "Created by" columns."""
    import getpass

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name (a container without a passwd entry)
        user = "unknown"
    return {"mlflow.source.name": source, "mlflow.source.type": "LOCAL", "mlflow.user": user}


def _gpu_type() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}/node"
    except Exception:  # noqa: BLE001 - a tag is never worth a crash
        pass
    return "cpu"


def _git_state() -> tuple[str | None, bool]:
    """The commit of the checkout this package runs from (None outside git)."""
    source_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source_dir,
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit or None, bool(status)
