"""Fixtures shared by the data-pipeline tests (helpers that are not fixtures live in tests/helpers/prepare_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prepare_helpers import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A WordPiece tokenizer trained on the test documents, once per test module."""
    return build_tokenizer(tmp_path_factory.mktemp("tok"))
