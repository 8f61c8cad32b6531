"""Long documents (`--task imdb`): IMDb's aclImdb folders and CSV/JSONL files read as the reviews and labels
they hold; head + tail truncation keeping exactly the first and last tokens; a run where the sentiment sits
only at the end of each review, learned with head + tail and not with the head alone; export scoring the
same windows; one-line errors naming the file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from finetune_helpers import (
    FILLERS,
    NEGATIVE,
    POSITIVE,
    SUBJECTS,
    assert_one_error_line,
    make_models,
    write_custom,
)

from distil.common.errors import UserError
from distil.pretrain.cli import main
from distil.pretrain.finetune.data import read_imdb

FAST = ["--seeds", "1", "--batch-size", "8", "--lr", "3e-3", "--no-tracking", "inference=false"]


def review(rng: random.Random, positive: bool, filler_words: int) -> str:
    """Neutral filler first, the verdict in the last sentence only."""
    body = " ".join(rng.choice((*SUBJECTS, *FILLERS, "the", "and")) for _ in range(filler_words))
    return f"{body} . the {rng.choice(SUBJECTS)} was {rng.choice(POSITIVE if positive else NEGATIVE)}"


def write_aclimdb(root: Path, n: int, seed: int, filler_words: int = 60) -> Path:
    rng = random.Random(seed)
    for i in range(n):
        positive = i % 2 == 0
        folder = root / ("pos" if positive else "neg")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}_{rng.randint(1, 10)}.txt").write_text(review(rng, positive, filler_words) + "<br /><br />")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return make_models(tmp_path_factory.mktemp("models"))


def test_the_aclimdb_layout_reads_pos_and_neg_and_leaves_unsup_out(tmp_path):
    write_aclimdb(tmp_path / "train", 6, 0)
    (tmp_path / "train" / "unsup").mkdir()
    (tmp_path / "train" / "unsup" / "0_0.txt").write_text("an unlabelled review")
    (tmp_path / "train" / "urls_pos.txt").write_text("http://example.org\n")
    split = read_imdb(str(tmp_path / "train"), kind="train")
    assert len(split) == 6 and sorted(split.labels) == ["neg"] * 3 + ["pos"] * 3
    assert all("<br" not in t and t.endswith(("good", "great", "fine", "nice", "superb", "lovely", "bad", "awful",
                                              "poor", "sad", "dull", "boring")) for t in split.texts)
    assert all(i.startswith(f"{y}/") for i, y in zip(split.index, split.labels, strict=True))


def test_imdb_as_a_file_maps_its_label_spellings(tmp_path):
    path = write_custom(tmp_path / "r.jsonl", [("a", None, "1"), ("b", None, "negative"), ("c", None, "pos")])
    assert read_imdb(str(path), kind="train").labels == ["pos", "neg", "pos"]
    bad = write_custom(tmp_path / "bad.csv", [("a", None, "pos"), ("b", None, "meh")])
    with pytest.raises(UserError, match=r"bad.csv line 3: label 'meh' is not an IMDb label"):
        read_imdb(str(bad), kind="train")


def test_head_tail_keeps_the_first_and_the_last_tokens(models):
    from transformers import AutoTokenizer

    from distil.pretrain.finetune.model import encode

    tok = AutoTokenizer.from_pretrained(models["teacher"])
    words = [w for w in (*SUBJECTS, *FILLERS)]
    text = " ".join(words)  # each word one token in this vocabulary
    pieces = tok(text, add_special_tokens=False)["input_ids"]
    assert len(pieces) == len(words)
    (ids,) = encode(tok, [text], None, 10, "head_tail", head_tokens=3)["input_ids"]
    assert ids == [tok.cls_token_id, *pieces[:3], *pieces[-5:], tok.sep_token_id]
    (default,) = encode(tok, [text], None, 10, "head_tail")["input_ids"]  # a quarter of the 8 free places
    assert default[1:-1] == pieces[:2] + pieces[-6:]
    (head,) = encode(tok, [text], None, 10, "head")["input_ids"]
    assert head[1:-1] == pieces[:8]
    (short,) = encode(tok, ["the film"], None, 10, "head_tail")["input_ids"]
    assert short == tok("the film")["input_ids"]


def test_the_verdict_at_the_end_is_learned_with_head_and_tail_not_with_the_head(models, tmp_path):
    train, dev = write_aclimdb(tmp_path / "aclImdb" / "train", 64, 1), write_aclimdb(tmp_path / "aclImdb" / "test", 40, 2)
    scores = {}
    for mode in ("head", "auto"):
        out = tmp_path / mode
        result = CliRunner().invoke(main, ["finetune", "--model", models["teacher"], "--task", "imdb", "--train",
                                           str(train), "--dev", str(dev), "--output", str(out), "--max-seq-len", "32",
                                           "--epochs", "6", *FAST, f"truncation={mode}", "save_models=true"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        scores[mode] = report["median"]["dev_accuracy"]
        assert report["truncation"]["mode"] == ("head" if mode == "head" else "head_tail")
    # the head alone never sees a verdict: chance (the dev set is balanced); head + tail sees every one
    assert scores["head"] <= 0.65 and scores["auto"] >= 0.85, scores

    from distil.pretrain.deploy.source import dev_set, load_source
    from distil.pretrain.finetune.model import encode

    saved = tmp_path / "auto" / "seed_42" / "model"
    assert json.loads((saved / "distil_task.json").read_text())["truncation"] == "head_tail"
    source = load_source(str(saved), None)
    assert source.task.name == "imdb"
    checked = dev_set(source, str(dev), 32, 4, None)  # distil export scores the windows fine-tuning used
    texts = read_imdb(str(dev), kind="dev").texts
    assert [b["input_ids"][0].tolist() for b in checked.singles] == encode(source.tokenizer, texts, None, 32,
                                                                           "head_tail")["input_ids"]


@pytest.mark.parametrize("case", ["no pos/neg", "only pos", "pairs with head_tail", "head_tokens too large"])
def test_imdb_and_truncation_mistakes_are_one_error_line(case, models, tmp_path):
    train = write_aclimdb(tmp_path / "train", 8, 3)
    dev = write_aclimdb(tmp_path / "dev", 4, 4)
    args = ["--task", "imdb", "--train", str(train), "--dev", str(dev)]
    needle = ""
    if case == "no pos/neg":
        (tmp_path / "empty").mkdir()
        args, needle = ["--task", "imdb", "--train", str(tmp_path / "empty"), "--dev", str(dev)], "pos/ and neg/"
    elif case == "only pos":
        for f in (dev / "neg").iterdir():
            f.unlink()
        (dev / "neg").rmdir()
        needle = "only pos/ is there"
    elif case == "pairs with head_tail":
        rows = [("a good film", "the plot", "1"), ("a bad film", "the cast", "0")] * 4
        args = ["--task", "custom", "--train", str(write_custom(tmp_path / "t.jsonl", rows)), "--dev",
                str(write_custom(tmp_path / "d.jsonl", rows)), "truncation=head_tail"]
        needle = "truncation=head_tail is for single-text tasks"
    else:
        args, needle = [*args, "head_tokens=40"], "head_tokens=40 must be in [0, max_seq_len - 2 = 30]"
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["finetune", "--model", models["teacher"], *args, "--output", str(out),
                                       "--max-seq-len", "32", "--epochs", "1", *FAST], catch_exceptions=False)
    assert_one_error_line(result, needle)
    assert not out.exists()
