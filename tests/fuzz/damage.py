"""Seeded damage to the files distil reads, as hypothesis strategies: the one harness of the fuzz tests.

A `Damage` is a printable edit of a file's bytes (kind + parameters): hypothesis draws it from a fixed
seed (`derandomize=True`, so every run tries the same cases and a failure replays), prints the failing
one and shrinks it to the smallest damage that still fails.

Pointing the harness at a new file kind: pick the damages that fit (`byte_damages(size)` fits every
file; `tree_edits(tree)` every JSON / YAML mapping; add a kind-specific one as `rename_member` for tars),
write the file, apply `damage.apply(original)`, and check the promise: the reader either copes (skips and
counts) or raises one `UserError` line naming the file (`assert_one_line_error`).
"""

from __future__ import annotations

import copy
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from distil.common.errors import UserError

SLOW = os.environ.get("DISTIL_FUZZ_CASES")  # e.g. DISTIL_FUZZ_CASES=1000 for a longer local hunt
DEFAULT_CASES = 30  # per kind, default tier
SLOW_CASES = 300  # per kind, slow tier


def fuzz_settings(cases: int) -> settings:
    return settings(
        max_examples=int(SLOW) if SLOW else cases,
        derandomize=True,  # seeded: the same cases every run
        database=None,  # nothing written into the tree
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large],
        print_blob=True,
    )


@dataclass(frozen=True)
class Damage:
    kind: str
    params: tuple = ()

    def apply(self, data: bytes) -> bytes:
        p = self.params
        if self.kind == "overwrite":  # ((offset, bytes), ...)
            out = bytearray(data)
            for offset, patch in p:
                out[offset : offset + len(patch)] = patch[: max(0, len(data) - offset)]
            return bytes(out[: len(data)])
        if self.kind == "truncate":
            return data[: p[0]]
        if self.kind == "insert":
            return data[: p[0]] + p[1] + data[p[0] :]
        if self.kind == "delete":
            return data[: p[0]] + data[p[0] + p[1] :]
        if self.kind == "empty":
            return b""
        if self.kind == "garbage":  # a file that is not of its kind at all
            return p[0]
        if self.kind == "rename_member":
            return _rename_member(data, p[0], p[1])
        if self.kind == "tree_edit":
            return p[0]
        raise ValueError(f"unknown damage kind {self.kind!r}")


def byte_damages(size: int) -> dict[str, st.SearchStrategy[Damage]]:
    """Damages that fit any file of `size` bytes, by kind."""
    # hypothesis favours small and boundary integers (the first header, again and again): half the
    # offsets are scattered over the whole file instead
    last = max(size - 1, 0)
    offset = st.one_of(st.integers(0, last), st.integers(1, 2**31).map(lambda x: x * 2654435761 % (last + 1)))
    return {
        "overwrite": st.lists(st.tuples(offset, st.binary(min_size=1, max_size=64)), min_size=1, max_size=8)
        .map(lambda spans: Damage("overwrite", tuple(spans))),
        "truncate": offset.map(lambda n: Damage("truncate", (n,))),
        "insert": st.tuples(offset, st.binary(min_size=1, max_size=64)).map(lambda t: Damage("insert", t)),
        "delete": st.tuples(offset, st.integers(1, 512)).map(lambda t: Damage("delete", t)),
        "empty": st.just(Damage("empty")),
        "garbage": st.binary(min_size=1, max_size=4096).map(lambda b: Damage("garbage", (b,))),
    }


# -- tars


def tar_member_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getnames()


def _rename_member(data: bytes, index: int, name: str) -> bytes:
    src = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    out = io.BytesIO()
    with src, tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as dst:
        for i, member in enumerate(src.getmembers()):
            payload = src.extractfile(member).read()
            if i == index:
                member.name = name
            dst.addfile(member, io.BytesIO(payload))
    return out.getvalue()


def rename_member(names: list[str]) -> st.SearchStrategy[Damage]:
    """A member renamed: to another extension, to a neighbour's key (a collision), or to anything."""
    index = st.integers(0, len(names) - 1)

    def new_name(i: int) -> st.SearchStrategy[str]:
        key = names[i].split(".", 1)[0]
        others = [n.split(".", 1)[0] for n in names]
        return st.one_of(
            st.sampled_from([f"{key}.txt", f"{key}.IDS.npy", f"{key}.ids.npy.bak", key, f"{key}.ids"]),
            st.sampled_from(others).map(lambda k: f"{k}.ids.npy"),
            st.text(st.characters(codec="ascii", exclude_characters="\0/"), min_size=1, max_size=40),
        )

    return index.flatmap(lambda i: new_name(i).map(lambda n: Damage("rename_member", (i, n))))


# -- JSON / YAML mappings


_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
                  st.text(max_size=12), st.lists(st.integers(-5, 5), max_size=3),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


def _edit(tree: Any, path: tuple, action: str, value: Any) -> Any:
    tree = copy.deepcopy(tree)
    parent = tree
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "drop":
        del parent[last]
    elif action == "rename" and isinstance(parent, dict):
        parent[f"{last}_x" if not isinstance(value, str) or not value else value] = parent.pop(last)
    else:
        parent[last] = value
    return tree


def tree_edits(tree: dict, dump) -> st.SearchStrategy[Damage]:
    """1-3 random edits of a mapping's keys, values and types (drop a key, rename it, set any value);
    `dump` writes the edited tree back to bytes."""
    paths = _paths(tree)
    one = st.tuples(st.sampled_from(paths), st.sampled_from(["drop", "rename", "set", "set"]), _LEAF)

    def build(edits: list) -> Damage:
        t = tree
        for path, action, value in edits:
            try:
                t = _edit(t, path, action, value)
            except (KeyError, IndexError, TypeError):
                pass  # the path went away with an earlier edit
        return Damage("tree_edit", (dump(t), tuple((p, a, repr(v)) for p, a, v in edits)))

    return st.lists(one, min_size=1, max_size=3).map(build)


def json_dump(tree: Any) -> bytes:
    return json.dumps(tree, indent=1).encode()


# -- the promise


def assert_one_line_error(error: UserError, names: str) -> None:
    """A UserError the CLI prints as one `error: ...` line (exit 2), naming the damaged file."""
    message = str(error)
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert names in message, f"{message!r} does not name {names}"


class Outcomes(Counter):
    """Outcome tally of a fuzz test (printed at the end of the module with -s, recorded in docs/data.md)."""

    def report(self, title: str) -> None:
        print(f"\n[fuzz] {title}: " + ", ".join(f"{k}={v}" for k, v in sorted(self.items())))
