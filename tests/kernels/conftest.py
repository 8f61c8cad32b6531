"""Kernel tests run the Triton kernels under the interpreter on CPU tensors (TRITON_INTERPRET=1, set in
tests/conftest.py before anything imports triton), with a fresh seed per run, printed so a failure replays.
"""

import os
import random
import secrets
import zlib

import pytest
import torch

SEED_ENV = "KERNELS_TEST_SEED"
SESSION_SEED = int(os.environ.get(SEED_ENV) or secrets.randbelow(2**31))


def pytest_report_header(config):
    return f"kernels tests: seed {SESSION_SEED} (reproduce with {SEED_ENV}={SESSION_SEED})"


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per run (printed, and in every failure message), fixed per test within a run."""
    value = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    print(f"\n{request.node.nodeid}: seed {value} (session {SEED_ENV}={SESSION_SEED})")
    torch.manual_seed(value)
    random.seed(value)
    return value
