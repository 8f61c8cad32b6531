"""`distil export`: tiny models fine-tuned here (a BERT and a DistilBERT on SST-2's layout, a RoBERTa on a custom
CSV) become ONNX fp32 and int8 models that ONNX Runtime runs at any batch and sequence length; the report's
checks and scores are recomputed here from the files; the MLflow run links the model's own run and `distil
review` shows the forms; every bad input is one error line and leaves nothing behind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from finetune_helpers import make_models, rows_for, write_custom, write_glue

from distil.pretrain.cli import main

pytest.importorskip("onnxruntime", reason="distil export needs the export extra (scripts/setup.sh installs it)")

FAST = ["--epochs", "2", "--seeds", "1", "--batch-size", "16", "--max-seq-len", "32", "--lr", "3e-3",
        "save_models=true", "inference=false"]


def invoke(command: str, args: list[str]):
    return CliRunner().invoke(main, [command, *args], catch_exceptions=False)


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> dict[str, Path]:
    """The helpers' BERT teacher and DistilBERT student fine-tuned on SST-2's layout (models kept)."""
    root = tmp_path_factory.mktemp("tuned")
    models = make_models(root)
    dev = write_glue("sst2", root / "sst2" / "dev.tsv", rows_for("sst2", 40, 2))
    train = write_glue("sst2", root / "sst2" / "train.tsv", rows_for("sst2", 96, 1))
    out = {"dev": dev, "store": root / "mlflow.db", "mlm_student": Path(models["student"])}
    for role in ("teacher", "student"):
        result = invoke("finetune", ["--model", models[role], "--task", "sst2", "--train", str(train), "--dev",
                                     str(dev), "--output", str(root / f"ft-{role}"), *FAST, "--tracking-uri",
                                     f"sqlite:///{out['store']}", "--experiment", "ship"])
        assert result.exit_code == 0, result.output
        out[role] = root / f"ft-{role}" / "seed_42" / "model"
    return out


def export(model: Path, dev: Path, out: Path, *extra: str):
    return invoke("export", ["--model", str(model), "--dev", str(dev), "--output", str(out), *extra])


def dev_inputs(model: Path, dev: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from transformers import AutoTokenizer

    rows = list(csv.reader(dev.open(), delimiter="\t"))[1:]
    tok = AutoTokenizer.from_pretrained(model)
    enc = tok([r[0] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}, np.array([int(r[1]) for r in rows])


def test_finetune_writes_what_export_needs_beside_the_model(tuned):
    info = json.loads((tuned["student"] / "distil_task.json").read_text())
    assert info["task"] == "sst2" and info["labels"] == ["0", "1"] and info["has_pair"] is False
    assert info["max_seq_len"] == 32 and info["seed"] == 42 and info["mlflow_run_id"]


def test_a_classifier_exports_to_fp32_and_int8_checked_and_timed(tuned, tmp_path):
    import onnxruntime
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "onnx"
    uri = f"sqlite:///{tuned['store']}"
    result = export(tuned["student"], tuned["dev"], out, "--tracking-uri", uri, "--experiment", "ship",
                    "--register", "student-onnx")
    assert result.exit_code == 0, result.output
    assert {"model.onnx", "model.int8.onnx", "config.json", "tokenizer.json", "distil_task.json",
            "export_report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "export_report.json").read_text())
    assert list(report["forms"]) == ["pytorch-fp32", "onnx-fp32", "onnx-int8"]
    assert report["task"] == "sst2" and report["examples"] == 40 and report["threads"] == 1
    assert report["check"]["passed"] and report["check"]["max_abs_diff"] <= 1e-4

    # Recomputed here: PyTorch and both ONNX models on the whole dev set at once (the report used batches of
    # 32 and single examples: dynamic batch and sequence axes).
    inputs, labels = dev_inputs(tuned["student"], tuned["dev"])
    model = AutoModelForSequenceClassification.from_pretrained(tuned["student"]).eval()
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    for form, file in (("onnx-fp32", "model.onnx"), ("onnx-int8", "model.int8.onnx")):
        session = onnxruntime.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        logits = session.run(None, {k: v for k, v in inputs.items() if k in names})[0]
        accuracy = float((logits.argmax(-1) == labels).mean())
        assert report["forms"][form]["score"] == pytest.approx(accuracy), form
        if form == "onnx-fp32":
            np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-3)
    torch_accuracy = float((ref.argmax(-1) == labels).mean())
    assert report["forms"]["pytorch-fp32"]["score"] == pytest.approx(torch_accuracy)
    int8 = report["forms"]["onnx-int8"]
    assert int8["score_drop_points"] == pytest.approx(100 * (torch_accuracy - int8["score"]))
    assert int8["size_bytes"] == (out / "model.int8.onnx").stat().st_size < report["forms"]["onnx-fp32"]["size_bytes"]
    for form in report["forms"].values():
        assert 0 < form["latency_ms_median"] <= form["latency_ms_p95"] and form["throughput_per_s"] > 0
        assert form["latency_examples"] == 40 and form["throughput_batch"] == 32

    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.params["mode"] == "export" and run.data.params["export.task"] == "sst2"
    source_run = json.loads((tuned["student"] / "distil_task.json").read_text())["mlflow_run_id"]
    assert run.data.tags["distil.export.source_run_id"] == source_run
    assert run.data.metrics["onnx_int8.score"] == pytest.approx(int8["score"])
    assert report["mlflow"]["registered"] == "student-onnx/1"
    (version,) = client.search_model_versions("name='student-onnx'")
    assert version.run_id == run.info.run_id and version.source.endswith("onnx/model.int8.onnx")


def test_review_shows_the_forms_of_teacher_and_student(tuned, tmp_path):
    uri = f"sqlite:///{tmp_path / 'review.db'}"
    for role in ("teacher", "student"):
        result = export(tuned[role], tuned["dev"], tmp_path / role, "--tracking-uri", uri, "--experiment", "forms")
        assert result.exit_code == 0, result.output
    review = invoke("review", ["--experiment", "forms", "--tracking-uri", uri, "--output", str(tmp_path / "c.png")])
    assert review.exit_code == 0, review.output
    assert "deployment forms on CPU" in review.output
    report = json.loads((tmp_path / "student" / "export_report.json").read_text())
    rows = [line for line in review.output.splitlines() if line.startswith("│ model") or "onnx-int8" in line]
    int8_rows = [line for line in rows if "onnx-int8" in line]
    assert len(int8_rows) == 2
    student_int8 = report["forms"]["onnx-int8"]
    assert any(f"{100 * student_int8['score']:.2f}" in line and f"{student_int8['latency_ms_median']:.2f}" in line
               for line in int8_rows), review.output


def test_a_masked_lm_exports_and_is_checked_on_text(tuned, tmp_path):
    dev = tmp_path / "dev.txt"
    dev.write_text("\n".join(r[0] for r in rows_for("sst2", 30, 5)) + "\n")
    out = tmp_path / "mlm"
    result = export(tuned["mlm_student"], dev, out, "--no-tracking", "--fp16", "--max-score-drop", "100")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export_report.json").read_text())
    assert report["kind"] == "masked-lm" and report["check"]["passed"]
    assert list(report["forms"]) == ["pytorch-fp32", "onnx-fp32", "onnx-int8", "onnx-fp16"]
    for form in report["forms"].values():
        assert 0 <= form["metrics"]["top1_accuracy"] == form["score"] <= 1
    assert (out / "model.fp16.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(5, 100, size=(3, 17)).astype(np.int64)
    (logits,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert logits.shape == (3, 17, json.loads((out / "config.json").read_text())["vocab_size"])


def test_a_roberta_classifier_on_a_custom_file(tmp_path):
    """Another family and a task of one's own: distil_task.json carries the labels; the export needs no --task."""
    from finetune_helpers import vocabulary_text
    from transformers import RobertaConfig, RobertaForMaskedLM

    from distil.data_pipeline.prepare.tokenize import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(lambda: [vocabulary_text()], 200)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=66,
                                             pad_token_id=1, type_vocab_size=1))
    model.save_pretrained(tmp_path / "rob")
    tokenizer.save_pretrained(tmp_path / "rob")
    files = {split: write_custom(tmp_path / f"{split}.csv", rows_for("single", n, seed))
             for split, n, seed in (("train", 48, 1), ("dev", 24, 2))}
    result = invoke("finetune", ["--model", str(tmp_path / "rob"), "--task", "custom", "--train", str(files["train"]),
                                 "--dev", str(files["dev"]), "--output", str(tmp_path / "ft"), *FAST, "--no-tracking"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "onnx"
    result = export(tmp_path / "ft" / "seed_42" / "model", files["dev"], out, "--no-tracking")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export_report.json").read_text())
    assert report["family"] == "roberta" and report["task"] == "custom" and report["check"]["passed"]


@pytest.mark.parametrize("case", ["no-head", "family", "opset", "tolerance", "int8-drop", "no-task", "not-empty",
                                  "missing-extra"])
def test_bad_input_is_one_error_line_and_nothing_is_written(case, tuned, tmp_path, monkeypatch):
    out = tmp_path / "out"
    model, extra = tuned["student"], ["--no-tracking"]
    if case == "no-head":
        from transformers import DistilBertModel

        bare = tmp_path / "bare"
        DistilBertModel.from_pretrained(tuned["mlm_student"]).save_pretrained(bare)
        model, says = bare, "has no head distil export takes (DistilBertModel)"
    elif case == "family":
        from transformers import ElectraConfig, ElectraForSequenceClassification

        model = tmp_path / "electra"
        ElectraForSequenceClassification(ElectraConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32,
                                                       embedding_size=16)).save_pretrained(model)
        says = "is a 'electra' model: distil export takes the families bert, distilbert, roberta"
    elif case == "opset":
        extra += ["--opset", "99"]
        says = "--opset 99: torch's exporter writes opset 18 or later"
    elif case == "tolerance":
        extra += ["--atol", "0", "--rtol", "0", "--no-int8"]
        says = "the ONNX model's outputs differ from PyTorch's by up to"
    elif case == "int8-drop":
        from distil.pretrain.deploy import runtime

        real = runtime.quantize_int8

        def scrambled(source, target):  # an int8 model of other weights: its dev score falls
            import onnx
            from onnx import numpy_helper

            graph = onnx.load(str(source))
            rng = np.random.default_rng(0)
            for init in graph.graph.initializer:
                values = numpy_helper.to_array(init)
                if values.dtype == np.float32 and values.ndim == 2:
                    init.CopyFrom(numpy_helper.from_array(rng.standard_normal(values.shape).astype(np.float32),
                                                          init.name))
            onnx.save(graph, str(target) + ".src.onnx")
            real(Path(str(target) + ".src.onnx"), target)

        monkeypatch.setattr(runtime, "quantize_int8", scrambled)
        extra += ["--max-score-drop", "0"]
        says = "the onnx-int8 model scores"
    elif case == "no-task":
        (tmp_path / "copy").mkdir()
        for f in tuned["student"].iterdir():
            if f.name != "distil_task.json":
                (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
        model, says = tmp_path / "copy", "without distil_task.json: give --task NAME"
    elif case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        says = "is not empty: pass --overwrite"
    else:
        import builtins

        real_import = builtins.__import__

        def no_runtime(name, *args, **kwargs):
            if name == "onnxruntime":
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_runtime)
        says = "distil export needs onnxruntime: install the extra with pip install 'distil[export]'"
    error = one_error(export(model, tuned["dev"], out, *extra))
    assert says in error, error
    if case == "not-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


def test_finetune_can_export_its_median_seed_and_report_the_forms(tuned, tmp_path):
    """finetune onnx=true: the median seed's model exported and checked, its forms in the report and the run."""
    uri = f"sqlite:///{tmp_path / 'ft.db'}"
    out = tmp_path / "ft"
    result = invoke("finetune", ["--model", str(tuned["mlm_student"]), "--task", "sst2", "--train",
                                 str(tuned["dev"]), "--dev", str(tuned["dev"]), "--output", str(out), *FAST,
                                 "onnx=true", "--tracking-uri", uri, "--experiment", "ft-onnx"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert list(report["forms"]) == ["pytorch-fp32", "onnx-fp32", "onnx-int8"]
    exported = json.loads((out / "onnx" / "export_report.json").read_text())
    assert exported["forms"] == report["forms"] and exported["check"]["passed"]
    assert report["forms"]["pytorch-fp32"]["score"] == pytest.approx(report["seeds"][0]["dev"]["dev_score"])
    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(report["mlflow"]["parent_run_id"])
    assert parent.data.metrics["onnx_int8.score"] == pytest.approx(report["forms"]["onnx-int8"]["score"])
    refused = invoke("finetune", ["--model", str(tuned["mlm_student"]), "--task", "sst2", "--train",
                                  str(tuned["dev"]), "--dev", str(tuned["dev"]), "--output", str(tmp_path / "no"),
                                  *FAST[:-2], "onnx=true", "--no-tracking"])
    assert "onnx=true exports the median seed's saved model: set save_models=true too" in refused.output
    assert not (tmp_path / "no").exists()


def test_a_question_answering_and_a_tagging_model_export_and_score_as_fine_tuning_did(tmp_path):
    """SQuAD v2 and CoNLL models: ONNX Runtime gives start/end logits (QA) or tag logits at any batch and length,
    and every form's dev score is recomputed with the fine-tuning's own answer search / entity scores."""
    from finetune_helpers import conll_sentences, qa_items, squad_json, write_conll

    from distil.pretrain.finetune.qa import read_squad

    models = make_models(tmp_path / "models")
    tasks = {"squad_v2": (squad_json(tmp_path / "t.json", qa_items(240, 1, unanswerable=0.3)),
                          squad_json(tmp_path / "d.json", qa_items(24, 2, unanswerable=0.3)),
                          ["--max-seq-len", "48", "doc_stride=16", "max_query_len=12", "max_answer_len=4"]),
             "conll": (write_conll(tmp_path / "t.txt", conll_sentences(80, 1)),
                       write_conll(tmp_path / "d.txt", conll_sentences(20, 2)), ["--max-seq-len", "32"])}
    for task, (train, dev, extra) in tasks.items():
        ft = tmp_path / f"ft-{task}"
        result = invoke("finetune", ["--model", models["teacher"], "--task", task, "--train", str(train), "--dev",
                                     str(dev), "--output", str(ft), "--epochs", "4", "--seeds", "1", "--batch-size", "8",
                                     "--lr", "3e-3", "save_models=true", "inference=false", "--no-tracking", *extra])
        assert result.exit_code == 0, result.output
        tuned_score = json.loads((ft / "report.json").read_text())["median"]["dev_score"]
        out = tmp_path / f"onnx-{task}"
        result = export(ft / "seed_42" / "model", dev, out, "--no-tracking", "--max-seq-len", extra[1],
                        "--max-score-drop", "100")
        assert result.exit_code == 0, result.output
        report = json.loads((out / "export_report.json").read_text())
        assert report["check"]["passed"] and list(report["forms"]) == ["pytorch-fp32", "onnx-fp32", "onnx-int8"]
        # PyTorch's form on the dev set scores what the fine-tuning reported for the same model
        assert report["forms"]["pytorch-fp32"]["score"] == pytest.approx(tuned_score)
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        ids = np.random.default_rng(0).integers(5, 60, size=(3, 19)).astype(np.int64)
        outputs = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                     "token_type_ids": np.zeros_like(ids)})
        if task == "squad_v2":
            assert [o.name for o in session.get_outputs()] == ["start_logits", "end_logits"]
            assert [o.shape for o in outputs] == [(3, 19), (3, 19)]
            assert report["forms"]["onnx-fp32"]["metrics"]["HasAns_total"] + report["forms"]["onnx-fp32"]["metrics"][
                "NoAns_total"] == len(read_squad(str(dev), kind="dev", version="squad_v2"))
        else:
            assert outputs[0].shape == (3, 19, len(json.loads((out / "config.json").read_text())["id2label"]))
            assert {"f1", "precision", "recall"} <= set(report["forms"]["onnx-int8"]["metrics"])
