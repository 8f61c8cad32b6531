"""One config system for every command: `--config FILE` (a path or a shipped name) < options < key=value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distil.common import assets
from distil.common.config import is_override
from distil.common.errors import UserError
from distil.data_pipeline.prepare.command import canonical_command, load_prepare_config
from distil.pretrain.config import load_config
from distil.pretrain.evaluate.command import load_evaluate_config

DISTIL = str(Path(sys.executable).parent / "distil")

PREPARE_OPTIONS = dict(inputs=(), output=None, tokenizer=None, train_tokenizer=None, max_seq_len=None, workers=None,
                       pack=False, holdout_fraction=None, shard_size_mb=None, text_field=None, doc_separator=None,
                       overwrite=False, seed=None, no_shuffle=False)
EVALUATE_OPTIONS = dict(models=(), shards=None, teacher=None, max_batches=None, batch_size=None, seed=None,
                        mask_smoothing=None, device=None, output=None, tracking_uri=None, experiment=None,
                        no_tracking=False)


def test_prepare_file_then_options_then_overrides(tmp_path):
    yaml = tmp_path / "prepare.yaml"
    yaml.write_text("inputs: [a.txt]\noutput: out\ntokenizer: tok\nmax_seq_len: 256\nseed: 3\npack: true\n")
    cfg = load_prepare_config(str(yaml), (), dict(PREPARE_OPTIONS))
    assert (cfg.inputs, str(cfg.output), cfg.max_seq_len, cfg.seed, cfg.pack) == (["a.txt"], "out", 256, 3, True)
    cfg = load_prepare_config(str(yaml), ("seed=9", "b.txt"), {**PREPARE_OPTIONS, "max_seq_len": 128})
    assert (cfg.max_seq_len, cfg.seed) == (128, 9)  # the option beats the file, key=value beats both
    assert cfg.inputs == ["b.txt"]  # paths given on the command line replace the file's list
    assert canonical_command(cfg)[:4] == ["distil", "prepare", "--input", "b.txt"]


def test_prepare_equal_settings_record_equal_commands(tmp_path):
    yaml = tmp_path / "p.yaml"
    yaml.write_text("inputs: [a.txt]\noutput: out\ntokenizer: tok\nmax_seq_len: 128\nshuffle: false\n")
    from_file = load_prepare_config(str(yaml), (), dict(PREPARE_OPTIONS))
    from_flags = load_prepare_config(None, ("a.txt",), {**PREPARE_OPTIONS, "output": Path("out"), "tokenizer": "tok",
                                                         "max_seq_len": 128, "no_shuffle": True})
    assert canonical_command(from_file) == canonical_command(from_flags)
    assert "--no-shuffle" in canonical_command(from_file)


@pytest.mark.parametrize("content, args, needle", [
    ("inputs: [a]\noutput: o\ntokenizer: t\nmax_seq_len: many\n", (), "max_seq_len"),
    ("inputs: [a]\noutput: o\ntokenizer: t\nbogus: 1\n", (), "bogus"),
    ("inputs: [a]\ntokenizer: t\n", (), "--output"),
    ("- just\n- a list\n", (), "mapping"),
    ("inputs: [a]\noutput: o\ntokenizer: t\n", ("seed=x",), "seed"),
])
def test_prepare_config_mistakes_are_one_line_user_errors(tmp_path, content, args, needle):
    yaml = tmp_path / "bad.yaml"
    yaml.write_text(content)
    with pytest.raises(UserError, match=needle) as caught:
        load_prepare_config(str(yaml), args, dict(PREPARE_OPTIONS))
    assert "\n" not in str(caught.value)


def test_evaluate_config_file_and_overrides(tmp_path):
    yaml = tmp_path / "eval.yaml"
    yaml.write_text("models: [runs/a/export, runs/b/export]\nshards: data\nbatch_size: 8\ntracking: false\n")
    cfg = load_evaluate_config(str(yaml), ("seed=4",), dict(EVALUATE_OPTIONS))
    assert (cfg.models, cfg.shards, cfg.batch_size, cfg.seed, cfg.tracking) == (
        ["runs/a/export", "runs/b/export"], "data", 8, 4, False)
    cfg = load_evaluate_config(str(yaml), (), {**EVALUATE_OPTIONS, "models": ("c",), "batch_size": 2})
    assert (cfg.models, cfg.batch_size) == (["c"], 2)
    with pytest.raises(UserError, match="batch.size"):
        load_evaluate_config(str(yaml), ("batch_size=0",), dict(EVALUATE_OPTIONS))
    with pytest.raises(UserError, match="key=value"):
        load_evaluate_config(str(yaml), ("stray",), dict(EVALUATE_OPTIONS))


def test_shipped_names_resolve_for_config_and_ds_config():
    assert load_config("tiny_cpu", ["data.shards=x"]).run.max_steps is not None
    assert assets.ds_config_path("cpu_zero2") == assets.DS_CONFIGS / "cpu_zero2.json"
    assert assets.ds_config_path("ds_configs/cpu_zero2.json").resolve() == assets.DS_CONFIGS / "cpu_zero2.json"
    with pytest.raises(UserError, match="shipped name .*distilbert_base_uncased"):
        assets.config_path("no_such_config")


def test_is_override_tells_settings_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_override("max_seq_len=128") and is_override("run.max_steps=5")
    assert not is_override("corpus.txt") and not is_override("/data/x=1.txt")
    (tmp_path / "odd=name.txt").write_text("x")
    assert not is_override("odd=name.txt")  # an existing file wins


def test_copy_shipped_refuses_to_overwrite_and_writes_nothing(tmp_path):
    written = assets.copy_shipped(tmp_path)
    assert {p.parent.name for p in written} == {"configs", "ds_configs", "launch"}
    target = tmp_path / "configs" / "tiny_cpu.yaml"
    target.write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        assets.copy_shipped(tmp_path)
    assert target.read_text() == "mine"
    assets.copy_shipped(tmp_path, overwrite=True)
    assert target.read_text() != "mine"


def test_prepare_cli_with_a_config_file(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of the small corpus with several words in it\n" for i in range(300)))
    yaml = tmp_path / "prepare.yaml"
    yaml.write_text(f"inputs: [{corpus}]\noutput: {tmp_path / 'shards'}\ntrain_tokenizer: 120\nmax_seq_len: 32\n")
    p = subprocess.run([DISTIL, "prepare", "--config", str(yaml), "seed=5", "-q"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    import json

    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["max_len"] == 32 and manifest["seed"] == 5
    bad = subprocess.run([DISTIL, "prepare", "--config", str(yaml), "max_seq_len=x"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
