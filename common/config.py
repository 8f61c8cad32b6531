"""One config system for every command: a typed dataclass tree built from a YAML file, the command's
options (shortcuts for keys) and `key=value` overrides, in that order of precedence (later wins).

OmegaConf checks keys and types against the dataclasses (an unknown key or a value of the wrong type is an
error); each command's `validate` checks what types cannot. Every problem is a `UserError` with one line
naming the key or file to change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distil.common import assets
from distil.common.errors import UserError

T = TypeVar("T")
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def one_line(e: OmegaConfBaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{first} (key: {key})" if key and str(key) not in first else first


def is_override(arg: str) -> bool:
    """`key=value` with a dotted key, and not the name of a file or folder that exists."""
    return bool(_OVERRIDE.match(arg)) and not os.path.exists(arg)


def _from_file(path: str | os.PathLike, sections: str) -> DictConfig:
    p = assets.config_path(path)
    try:
        from_file = OmegaConf.load(p)
    except Exception as e:  # yaml errors come in several types
        raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(from_file, DictConfig):
        raise UserError(f"config file {p} must hold a mapping of {sections}")
    return from_file


def load_structured(schema: type[T], path: str | os.PathLike | None, overrides: Iterable[str] = (), *,
                    shortcuts: Mapping[str, Any] | None = None, sections: str = "keys",
                    example: str = "key=value") -> T:
    """YAML file (optional) < shortcuts (dotted key -> value, None = not given) < `key=value` overrides."""
    merged: DictConfig = OmegaConf.structured(schema)
    if path is not None:
        from_file = _from_file(path, sections)
        try:
            merged = OmegaConf.merge(merged, from_file)
        except OmegaConfBaseException as e:
            raise UserError(f"config file {assets.config_path(path)}: {one_line(e)}") from None
    try:
        for key, value in (shortcuts or {}).items():
            if value is not None:
                OmegaConf.update(merged, key, value, merge=False)
    except OmegaConfBaseException as e:
        raise UserError(f"option for {key}: {one_line(e)}") from None
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. {example})")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(f"config override: {one_line(e)}") from None
    assert isinstance(cfg, schema)
    return cfg


def to_container(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys; lists and tuples stay one value."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def only_overrides(args: Iterable[str], example: str) -> list[str]:
    """The `key=value` arguments of a command that takes no other positional ones; anything else is one
    error line."""
    args = list(args)
    bad = [a for a in args if not is_override(a)]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r}: settings go as key=value (e.g. {example}) or options")
    return args


def flag(given: bool, value: bool) -> bool | None:
    """A click flag as a shortcut: `value` when the flag was given, else None (the file's setting stands)."""
    return value if given else None


def load_command_config(schema: type[T], path: str | os.PathLike | None, overrides: Iterable[str],
                        shortcuts: Mapping[str, Any], example: str) -> T:
    """`load_structured`, then the command's own `validate()`: what every command's CLI calls."""
    cfg = load_structured(schema, path, overrides, shortcuts=shortcuts, example=example)
    cfg.validate()  # type: ignore[attr-defined]
    return cfg
