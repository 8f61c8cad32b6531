"""common/ helpers directly: atomic writes leave the old file or folder whole when the write fails,
splitmix64 matches the published algorithm, and the tables' number formats."""

from __future__ import annotations

import numpy as np
import pytest

from distil.common.files import atomic_write_folder, atomic_write_json, atomic_write_text
from distil.common.formatting import fmt_count, fmt_duration, fmt_number
from distil.common.hashing import mix_seed, splitmix64, unit_floats


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_json(target, {"step": 1})
    assert target.read_text() == '{\n  "step": 1\n}\n'
    with pytest.raises(TypeError):
        atomic_write_text(target, None)  # type: ignore[arg-type]  # fails inside the write
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failed_folder_build_keeps_the_old_folder(tmp_path):
    target = tmp_path / "export"
    atomic_write_folder(target, lambda d: (d / "model.bin").write_text("v1"))

    def half_then_fail(d):
        (d / "model.bin").write_text("v2 partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_folder(target, half_then_fail)
    assert (target / "model.bin").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    atomic_write_folder(target, lambda d: (d / "model.bin").write_text("v2"))
    assert (target / "model.bin").read_text() == "v2"


def test_splitmix64_is_the_published_generator():
    # splitmix64 seeded with 0 yields 0xE220A8397B1DCDAF, then 0x6E789E6AA1B965F4: its states are k * golden
    # ratio, which are this function's (index 0, key k - 1).
    assert splitmix64(0, np.array([0]))[0] == np.uint64(0xE220A8397B1DCDAF)
    assert splitmix64(1, np.array([0]))[0] == np.uint64(0x6E789E6AA1B965F4)
    u = unit_floats(7, np.arange(100_000))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(unit_floats(7, np.arange(10)), unit_floats(7, np.arange(10)))
    assert mix_seed([1, 2, 3]) == mix_seed([1, 2, 3]) != mix_seed([1, 3, 2])
    assert 0 <= mix_seed([2**70, -1]) < 2**64


def test_table_formats():
    assert fmt_number(None) == "-" and fmt_number(0.123456) == "0.1235"
    assert [fmt_count(n) for n in (None, 999, 66_362_880, 1_234_567_890)] == ["-", "999", "66.4M", "1.23B"]
    assert [fmt_duration(s) for s in (None, 65, 3725)] == ["-", "1m05s", "1h02m"]

