"""pretrain/run/lifecycle.py and stopsignal.py directly: the finished marker, restart tags, the messages a run
ends with, and the stop signal recorded instead of ending the process."""

from __future__ import annotations

import json
import os
import signal

import pytest

from distil.pretrain.checkpoint.files import COMPLETE, TRAINER_STATE, tag_for
from distil.pretrain.run import stopsignal
from distil.pretrain.run.lifecycle import (
    FINISHED_MARKER,
    AlreadyFinished,
    check_not_finished,
    mark_finished,
    nonfinite_message,
    restart_tags,
)


def checkpoint(run_dir, step):
    path = run_dir / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    (path / TRAINER_STATE).write_text(json.dumps({"counters": {"step": step}}))
    (path / COMPLETE).write_text(path.name)
    return path


def test_a_finished_run_is_recognised_only_at_its_final_checkpoint(tmp_path):
    final = checkpoint(tmp_path, 40)
    earlier = checkpoint(tmp_path, 20)
    check_not_finished(tmp_path, final, 40)  # no marker yet: not finished
    mark_finished(tmp_path, final, 40, None)
    assert json.loads((tmp_path / FINISHED_MARKER).read_text())["checkpoint"] == final.name
    with pytest.raises(AlreadyFinished, match="finished at step 40"):
        check_not_finished(tmp_path, final, 40)
    check_not_finished(tmp_path, final, 60)  # asked for more steps: goes on
    check_not_finished(tmp_path, earlier, 40)  # resumed from another checkpoint: goes on
    (tmp_path / FINISHED_MARKER).write_text("{not json")
    check_not_finished(tmp_path, final, 40)  # a damaged marker is not a finished run


def test_restart_tags_carry_slurms_restart_count(monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert restart_tags(2, 120) == {"distil.restarts": "2", "distil.resumed_at_step": "120"}
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert restart_tags(1, 5)["distil.slurm_restart_count"] == "3"


def test_the_nonfinite_message_names_the_last_good_checkpoint_and_what_to_change(tmp_path):
    text = nonfinite_message(3, 17, tmp_path / "step_00000014")
    assert "3 optimizer step(s) in a row at step 17" in text and "step_00000014" in text and "optim.lr" in text
    assert "none written yet" in nonfinite_message(1, 1, None)


def test_a_stop_signal_is_recorded_not_fatal():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stopsignal.reset()
        stopsignal.install()
        assert stopsignal.received() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopsignal.received() == signal.SIGTERM
        stopsignal.reset()
        assert stopsignal.received() is None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stopsignal._installed = False
        stopsignal.reset()
