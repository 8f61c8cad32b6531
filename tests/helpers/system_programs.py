"""Tests that drive system programs (SLURM, munge, Chromium): skip with the reason where one is missing, but
fail in CI (CI set), where scripts/system_packages.sh must have installed them."""

from __future__ import annotations

import os

import pytest


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI requires it (scripts/system_packages.sh)", pytrace=False)
    pytest.skip(reason)
