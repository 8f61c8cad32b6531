"""Fixtures of the cluster tests: tiny shards and a tiny teacher, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_helpers import kill_leftover_ranks, make_shards, make_teacher


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("cluster_data"))


@pytest.fixture(scope="session")
def teacher(shards, tmp_path_factory) -> Path:
    return make_teacher(shards, tmp_path_factory.mktemp("cluster_teacher") / "teacher")


@pytest.fixture(autouse=True)
def _no_rank_outlives_its_test():
    yield
    kill_leftover_ranks()
