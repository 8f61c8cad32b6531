"""pretrain/metrics/ directly: the window's sums and their reduction, metrics.jsonl rewritten on a resume, and the
FLOP model against a count by hand."""

from __future__ import annotations

import json

import torch

from distil.pretrain.metrics.flops import FlopModel, encoder_flops_per_token, head_flops_per_row
from distil.pretrain.metrics.window import MetricsSink, Window, drop_lines_after
from distil.pretrain.tracking.tracker import NullTracker


def test_the_window_averages_loss_parts_per_micro_step_and_sums_the_counts():
    w = Window()
    w.add({"loss": torch.tensor(2.0), "loss_kl": torch.tensor(1.0)}, sequences=4, tokens=50, masked=7, flops=10.0)
    w.add({"loss": torch.tensor(4.0), "loss_kl": torch.tensor(3.0)}, sequences=4, tokens=30, masked=5, flops=6.0)
    totals = w.reduce(torch.device("cpu"), world_size=1)
    assert totals.losses == {"loss": 3.0, "loss_kl": 2.0}
    assert (totals.micro_steps, totals.sequences, totals.tokens, totals.masked, totals.flops) == (2, 8, 80, 12, 16)
    assert totals.seconds > 0


def test_lines_after_the_resumed_step_and_a_torn_line_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6, 8)) + '{"step": 1')
    assert drop_lines_after(path, 4) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert drop_lines_after(path, 4) == 0 and drop_lines_after(tmp_path / "missing.jsonl", 0) == 0


def test_a_resumed_sink_appends_after_the_step_it_starts_from(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    sink = MetricsSink(tmp_path, NullTracker(), total_steps=10, initial=2, enabled=True)
    sink.write(3, {"loss": 0.5, "lr": 1e-4, "tokens_per_s": 100.0})
    sink.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def test_flops_of_a_distillation_micro_step_count_by_hand():
    h, f, n, v, seq = 8, 32, 2, 50, 4
    per_token = 2 * n * (4 * h * h + 2 * h * f + 2 * seq * h)
    per_row = 2 * (h * h + h * v)
    assert encoder_flops_per_token(h, f, n, seq) == per_token and head_flops_per_row(h, v) == per_row
    student_only = FlopModel((h, f, n), v).micro_step(batch_tokens=12, seq_len=seq, projected_rows=5)
    assert student_only == 3 * (12 * per_token + 5 * per_row)  # forward + backward
    with_teacher = FlopModel((h, f, n), v, teacher=(h, f, 2 * n)).micro_step(12, seq, 5)
    assert with_teacher == student_only + 12 * 2 * per_token + 5 * per_row  # the teacher's forward only
