"""Suite-wide settings: tests never reach the network and run DeepSpeed on the CPU accelerator."""

import os
from pathlib import Path

import pytest

_SEGMENTS_BEFORE = pytest.StashKey[set]()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# The kernel tests run the Triton kernels under the interpreter on CPU tensors. TRITON_INTERPRET must be set
# before triton is first imported, and transformers imports it while any test module that loads a model is
# collected, so it is set here, before collection. It changes nothing else: on CPU tensors the kernels'
# automatic backend choice is the torch implementation.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Slow (multi-process) tests first: with pytest-xdist (scripts/test.sh) the longest files then start
    while the quick ones fill the other worker, instead of one long file running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _environment_restored_after_each_test():
    """A test's changes to os.environ end with it. (mlflow.set_tracking_uri, for one, also exports
    MLFLOW_TRACKING_URI: with two pytest workers, a later test's subprocesses then tracked into the store
    of a test that ran before it in the same worker.)"""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def _cpu_allreduce_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def pytest_sessionstart(session):
    session.config.stash[_SEGMENTS_BEFORE] = _cpu_allreduce_segments()


def pytest_sessionfinish(session, exitstatus):
    """No run the suite started leaves DeepSpeed's CPU all-reduce segments in /dev/shm (66 MB each, held in
    memory until removed: before the ranks removed them, the suite's runs filled a CI machine's memory)."""
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller checks once
        return
    left = sorted(_cpu_allreduce_segments() - session.config.stash.get(_SEGMENTS_BEFORE, set()))
    if left:
        session.config.get_terminal_writer().line(
            f"error: the tests left {len(left)} DeepSpeed CPU all-reduce segment(s) in /dev/shm: {', '.join(left)}",
            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
