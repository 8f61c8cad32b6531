"""Config: YAML + overrides into the typed tree; every user mistake is one UserError line."""

from __future__ import annotations

from pathlib import Path

import pytest

from distil.common.config import flatten, to_container
from distil.common.errors import UserError
from distil.pretrain.config import check_batch_arithmetic, load_config, warmup_steps

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "teacher:\n  path: some/teacher\ndata:\n  shards: some/shards\n"


def test_defaults_are_the_recipe(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert (cfg.loss.temperature, cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos) == (2.0, 5.0, 2.0, 1.0)
    assert cfg.loss.restrict_ce_to_mask is False
    assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.eps == 1e-6 and cfg.optim.max_grad_norm == 5.0
    assert cfg.optim.lr == 5e-4 and cfg.run.seed == 56 and cfg.run.epochs == 3
    assert cfg.data.masking.mlm_probability == 0.15 and cfg.data.masking.smoothing == 0.7


def test_overrides_apply_and_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["run.max_steps=7", "loss.restrict_ce_to_mask=true",
                                              "student.layers=[0,3]", "data.masking.mlm_probability=0.2"])
    assert cfg.run.max_steps == 7 and cfg.loss.restrict_ce_to_mask is True
    assert cfg.student.layers == [0, 3] and cfg.data.masking.mlm_probability == 0.2
    flat = flatten(to_container(cfg))
    assert flat["run.max_steps"] == 7 and flat["student.layers"] == [0, 3]


@pytest.mark.parametrize("text, overrides, needle", [
    (BASE + "bogus: 1\n", [], "bogus"),
    (BASE, ["loss.alpha_cosine=1"], "alpha_cosine"),
    (BASE, ["run.max_steps=many"], "max_steps"),
    (BASE, ["loss.temperature=0"], "loss.temperature"),
    (BASE, ["engine.zero_stage=3"], "engine.zero_stage"),
    (BASE, ["engine.precision=fp8"], "engine.precision"),
    (BASE, ["mode=clm"], "mode"),
    (BASE, ["data.max_tokens=4096"], "data.batch_size"),
    (BASE, ["data.masking.mask_fraction=0.95"], "mask_fraction"),
    (BASE, ["run.max_steps"], "key=value"),
    (BASE, ["tracking.experiment= "], "tracking.experiment"),
    ("data:\n  shards: s\n", [], "teacher.path"),
    ("teacher:\n  path: t\n", [], "data.shards"),
    ("- a\n- b\n", [], "mapping"),
    ("a: [\n", [], "YAML"),
])
def test_bad_config_is_one_clear_line(tmp_path, text, overrides, needle):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, text), overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_mlm_mode_needs_no_teacher(tmp_path):
    cfg = load_config(write(tmp_path, "mode: mlm\ndata:\n  shards: s\n"))
    assert cfg.mode == "mlm"


def test_batch_arithmetic(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["data.batch_size=5", "engine.gradient_accumulation_steps=50",
                                              "engine.global_batch_size=2000"])
    assert check_batch_arithmetic(cfg, world_size=8) == 2000
    with pytest.raises(UserError, match="gradient_accumulation_steps=100 would make it"):
        check_batch_arithmetic(cfg, world_size=4)


def test_warmup_is_five_percent(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert warmup_steps(cfg, 1000) == 50
    assert warmup_steps(cfg, 10) == 1


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    """Every config in configs/ has valid keys and values (paths some leave to the caller are filled in)."""
    cfg = load_config(REPO / "configs" / name, ["data.shards=some/shards", "teacher.path=some/teacher"])
    assert cfg.mode in ("distill", "mlm")


def test_a_config_with_the_old_bert_section_is_told_to_rename_it(tmp_path):
    old = write(tmp_path, "mode: mlm\ndata:\n  shards: s\nbert:\n  hidden_size: 64\n")
    with pytest.raises(UserError, match=r"the `bert:` section is now `model:` .*rename bert\.\* keys to model\.\*"):
        load_config(old)
    with pytest.raises(UserError, match=r"^bert.hidden_size=64: the `bert:` section is now `model:`"):
        load_config(None, ["mode=mlm", "data.shards=s", "bert.hidden_size=64"])


def test_mlm_mode_names_the_families_it_builds(tmp_path):
    cfg = load_config(None, ["mode=mlm", "data.shards=s", "model.family=roberta"])
    assert cfg.model.family == "roberta"
    with pytest.raises(UserError, match=r"model.family is 'gpt2': distil works with the families bert, distilbert"):
        load_config(None, ["mode=mlm", "data.shards=s", "model.family=gpt2"])
