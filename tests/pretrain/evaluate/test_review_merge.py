"""`distil review` puts `distil evaluate` results on the row of the training run whose export they scored."""

from types import SimpleNamespace

from distil.pretrain.evaluate.review import RunSummary, merge_evaluations


def _run(params: dict[str, str]):
    return SimpleNamespace(data=SimpleNamespace(params=params))


def _summary(name: str, role: str, final: dict[str, float]) -> RunSummary:
    return RunSummary(run_id=name, name=name, role=role, teacher="", status="FINISHED", num_parameters=None,
                      final=dict(final), tokens_per_s=None, steps=None, wall_time_s=None)


def test_eval_metrics_join_the_training_row_and_eval_rows_go(tmp_path):
    teacher_out, student_out, other = tmp_path / "teacher", tmp_path / "student", tmp_path / "elsewhere"
    runs = [
        _run({"mode": "mlm", "run.output_dir": str(teacher_out)}),
        _run({"mode": "distill", "run.output_dir": str(student_out)}),
        _run({"mode": "evaluate"}),
        _run({"mode": "eval", "eval.model_path": str(teacher_out / "export")}),
        _run({"mode": "eval", "eval.model_path": str(student_out / "export")}),
        _run({"mode": "eval", "eval.model_path": str(other)}),
    ]
    summaries = [
        _summary("teacher", "teacher", {"loss": 3.0}),
        _summary("student", "student", {"loss": 9.0}),
        _summary("evaluate", "evaluate", {}),
        _summary("eval-teacher", "eval", {"eval_mlm_loss": 2.5, "eval_top1_accuracy": 0.4}),
        _summary("eval-student", "eval", {"eval_mlm_loss": 3.5, "eval_kl_from_teacher": 0.7}),
        _summary("eval-other", "eval", {"eval_mlm_loss": 4.0}),
    ]
    kept = merge_evaluations(runs, summaries)
    assert [s.name for s in kept] == ["teacher", "student", "eval-other"]
    assert kept[0].final == {"loss": 3.0, "eval_mlm_loss": 2.5, "eval_top1_accuracy": 0.4}
    assert kept[1].final == {"loss": 9.0, "eval_mlm_loss": 3.5, "eval_kl_from_teacher": 0.7}
    assert kept[2].final == {"eval_mlm_loss": 4.0}


def test_later_evaluation_of_the_same_export_wins(tmp_path):
    out = tmp_path / "student"
    runs = [_run({"mode": "distill", "run.output_dir": str(out)}),
            _run({"mode": "eval", "eval.model_path": str(out / "export")}),
            _run({"mode": "eval", "eval.model_path": str(out / "export")})]
    summaries = [_summary("student", "student", {"loss": 1.0}),
                 _summary("eval-1", "eval", {"eval_mlm_loss": 5.0}),
                 _summary("eval-2", "eval", {"eval_mlm_loss": 4.0})]
    kept = merge_evaluations(runs, summaries)
    assert len(kept) == 1 and kept[0].final["eval_mlm_loss"] == 4.0
