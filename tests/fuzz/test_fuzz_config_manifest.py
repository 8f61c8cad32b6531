"""Fuzzing manifest.json, token_counts.npy and YAML configs: any damage is either harmless or one UserError line
(the CLI's `error: ...`, exit 2) naming the file or key to fix; never a traceback, never a hang."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from damage import (
    DEFAULT_CASES,
    SLOW_CASES,
    Outcomes,
    assert_one_line_error,
    byte_damages,
    fuzz_settings,
    json_dump,
    tree_edits,
)
from hypothesis import given
from hypothesis import strategies as st
from shardset import make_shard_set

from distil.common import assets
from distil.common.errors import UserError
from distil.data_pipeline.manifest import MANIFEST_NAME, TOKEN_COUNTS_NAME
from distil.data_pipeline.masking import MaskingConfig
from distil.data_pipeline.stream.loader import PretrainStream
from distil.pretrain.config import load_config

VOCAB = 1000
OUTCOMES: dict[str, Outcomes] = {}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = make_shard_set(tmp_path_factory.mktemp("fuzz_side"), [24, 24], vocab_size=VOCAB)
    yield root
    for name, outcomes in OUTCOMES.items():
        outcomes.report(name)


def damages(name: str, original: bytes, tree: dict | None, dump) -> st.SearchStrategy:
    kinds = dict(byte_damages(len(original)))
    if tree is not None:
        kinds["tree_edit"] = tree_edits(tree, dump)
    return st.sampled_from(sorted(kinds)).flatmap(lambda k: kinds[k])


def try_stream(root) -> None:
    """A whole epoch, as many batches as the stream promised, each within the vocabulary: damage that only shows
    late (a sample count, the last shard's entry) must not pass as "runs"."""
    stream = PretrainStream(str(root), batch_size=8, masking=MaskingConfig(), shuffle_buffer=16)
    promised = stream.batches_per_epoch()
    batches = 0
    for batch in stream:
        assert int(batch["input_ids"].max()) < VOCAB and int(batch["input_ids"].min()) >= 0
        batches += 1
    assert batches == promised, f"{batches} batches of the {promised} promised"


def fuzz_side_file(root, name: str, cases: int) -> None:
    path = root / name
    original = path.read_bytes()
    tree = json.loads(original) if name.endswith(".json") else None
    outcomes = OUTCOMES.setdefault(name, Outcomes())

    @fuzz_settings(cases)
    @given(damages(name, original, tree, json_dump))
    def case(damage):
        path.write_bytes(damage.apply(original))
        try:
            try_stream(root)
            outcomes[f"{damage.kind}: runs"] += 1
        except UserError as e:
            assert_one_line_error(e, name if name != MANIFEST_NAME else "manifest")
            outcomes[f"{damage.kind}: error line"] += 1
        finally:
            path.write_bytes(original)

    case()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [MANIFEST_NAME, TOKEN_COUNTS_NAME])
def test_damaged_side_file_is_one_error_line(shard_set, name):
    fuzz_side_file(shard_set, name, DEFAULT_CASES * 2)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", [MANIFEST_NAME, TOKEN_COUNTS_NAME])
def test_damaged_side_file_slow_tier(shard_set, name):
    fuzz_side_file(shard_set, name, SLOW_CASES)


CONFIG = "tiny_cpu.yaml"


def fuzz_config(tmp_path, cases: int) -> None:
    original = assets.config_path(CONFIG).read_bytes()
    tree = yaml.safe_load(original)
    path = tmp_path / "fuzzed.yaml"
    outcomes = OUTCOMES.setdefault("config", Outcomes())
    top = "|".join(map(re.escape, tree))
    KEY = re.compile(rf"\b({top})(\.\w+)+|\b({top})=")  # a key of the config: data.batch_size, mode=...

    def dump(t) -> bytes:
        return yaml.safe_dump(t).encode()

    @fuzz_settings(cases)
    @given(damages(CONFIG, original, tree, dump))
    def case(damage):
        path.write_bytes(damage.apply(original))
        try:
            load_config(path)
            outcomes[f"{damage.kind}: loads"] += 1
        except UserError as e:
            assert_one_line_error(e, "")
            message = str(e)
            # what to change: the file (unreadable YAML, not a mapping) or the key at fault
            assert path.name in message or KEY.search(message), f"names neither {path.name} nor a key: {message!r}"
            outcomes[f"{damage.kind}: error line"] += 1

    case()


@pytest.mark.timeout(300)
def test_damaged_config_is_one_error_line(tmp_path):
    fuzz_config(tmp_path, DEFAULT_CASES * 3)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_damaged_config_slow_tier(tmp_path):
    fuzz_config(tmp_path, SLOW_CASES * 3)
