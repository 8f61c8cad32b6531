"""SIGTERM / SIGINT, remembered from the first moment of `distil train` until the trainer acts on them.

A scheduler may signal a job at any time, set-up included (imports and model loading can take a minute).
Python's default would end the process at once, losing the steps since the last checkpoint and, on a run
that never got past set-up, any progress at all; instead the signal is recorded here and the trainer stops
at its next update boundary with a checkpoint. Kept light (no torch) so the CLI installs it before it
imports anything heavy.
"""

from __future__ import annotations

import signal
from typing import Any

from distil.common.signals import STOP_SIGNALS

_received: int | None = None
_installed = False


def _handler(signum: int, _frame: Any) -> None:
    global _received
    _received = signum


def install() -> None:
    """Records SIGTERM/SIGINT from now on (idempotent; the main thread only, as Python requires)."""
    global _installed
    if not _installed:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handler)
        _installed = True


def received() -> int | None:
    """The last stop signal received since install() (None: none)."""
    return _received


def reset() -> None:
    """Forgets a received signal (for a second run in the same process)."""
    global _received
    _received = None
