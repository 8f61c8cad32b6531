"""The files distil ships beside its code: training configs, DeepSpeed JSONs and launch scripts.

In a clone they are the repository's `configs/`, `ds_configs/` and `launch/`; in an installed wheel they are
the package data `distil/configs`, `distil/ds_configs` and `distil/launch`. Both sit one level above this
package, so one rule finds them either way. `--config NAME` and `engine.ds_config` accept a shipped name as
well as a path; `distil init DIR` copies them out to edit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from distil.common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]  # the repository in a clone, site-packages/distil when installed
CONFIGS = ROOT / "configs"
DS_CONFIGS = ROOT / "ds_configs"
LAUNCH = ROOT / "launch"
SHIPPED = {"configs": (CONFIGS, ".yaml"), "ds_configs": (DS_CONFIGS, ".json"), "launch": (LAUNCH, "")}


def shipped_names(kind: str) -> list[str]:
    folder, suffix = SHIPPED[kind]
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(suffix) if suffix else p.name
                  for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix) and not p.name.startswith("."))


def _resolve(value: str | os.PathLike, kind: str, what: str) -> Path:
    """A path that exists (as given, then relative to the shipped root), else a shipped file by name."""
    folder, suffix = SHIPPED[kind]
    given = Path(value)
    candidates = [given, ROOT / given]
    if given.parent == Path("."):
        candidates += [folder / given.name, folder / f"{given.name}{suffix}"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(shipped_names(kind)) or "none"
    raise UserError(f"{what} {value} does not exist: give a path to a file, or a shipped name ({names})")


def config_path(value: str | os.PathLike, what: str = "config file") -> Path:
    return _resolve(value, "configs", what)


def ds_config_path(value: str | os.PathLike) -> Path:
    return _resolve(value, "ds_configs", "engine.ds_config")


def copy_shipped(dest: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Copies configs/, ds_configs/ and launch/ into `dest`; refuses to overwrite files unless asked.

    Every clash is found before anything is written, so a refused copy leaves `dest` untouched.
    """
    dest = Path(dest)
    plan: list[tuple[Path, Path]] = []
    for kind, (folder, suffix) in SHIPPED.items():
        for name in shipped_names(kind):
            plan.append((folder / f"{name}{suffix}", dest / kind / f"{name}{suffix}"))
    if not plan:
        raise UserError(f"no shipped configs found under {ROOT}: reinstall distil")
    clashes = [target for _, target in plan if target.exists()]
    if clashes and not overwrite:
        raise UserError(f"{clashes[0]} already exists ({len(clashes)} files would be replaced): pass --overwrite "
                        "or choose another folder")
    for source, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        if target.parent.name == "launch":  # a wheel may not keep the executable bit
            target.chmod(target.stat().st_mode | 0o111)
    return [target for _, target in plan]
