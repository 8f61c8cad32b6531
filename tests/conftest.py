"""Suite-wide settings: tests never reach the network and run DeepSpeed on the CPU accelerator."""

import os

import pytest

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
