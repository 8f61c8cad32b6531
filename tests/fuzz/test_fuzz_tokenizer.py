"""Fuzzing a saved tokenizer (the shard set's tokenizer/ folder, or one given to `distil prepare
--tokenizer`): tokenizer.json and tokenizer_config.json (what a saved fast tokenizer holds) damaged at random. The promise:
loading is one `UserError` line naming the folder, never a traceback; a damaged tokenizer that still loads is
compared with the undamaged one on real text (standard-library documentation): `distil prepare` may be handed
any tokenizer (one that tokenises otherwise is counted, not refused), but the shard set's own folder, which
the trainer exports beside the model, is accepted only if it tokenises as the one that made the shards."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile

import pytest
from damage import DEFAULT_CASES, SLOW_CASES, Outcomes, assert_one_line_error, byte_damages, fuzz_settings
from hypothesis import given
from prepare_helpers import build_tokenizer
from transformers import AutoTokenizer

from distil.common.errors import UserError
from distil.data_pipeline.prepare.tokenize import load_tokenizer, tokenizer_sha256
from distil.pretrain.export import check_tokenizer_source

FILES = ("tokenizer.json", "tokenizer_config.json")
OUTCOMES: dict[str, Outcomes] = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = build_tokenizer(tmp_path_factory.mktemp("tok"))
    yield folder
    for name, outcomes in OUTCOMES.items():
        outcomes.report(name)


REAL_TEXT = [m.__doc__ for m in (argparse, json, shutil, subprocess, tarfile) if m.__doc__]


def _ids(tokenizer) -> list[list[int]]:
    return tokenizer(REAL_TEXT)["input_ids"]


def _check(folder, reference: list[list[int]], sha256: str) -> str:
    """prepare's loading, then the trainer's export check with the shards' tokenizer hash."""
    try:
        tok = load_tokenizer(str(folder))
    except UserError as error:
        assert_one_line_error(error, str(folder))
        prepare = "error"
    else:
        prepare = "loads, same output" if _ids(tok) == reference else "loads, other output"
    try:
        check_tokenizer_source(str(folder), sha256)
    except UserError as error:
        assert_one_line_error(error, str(folder))
        export = "refused"
    else:
        assert _ids(AutoTokenizer.from_pretrained(str(folder))) == reference, "accepted a tokenizer that differs"
        export = "accepted, same output"
    return f"prepare: {prepare} / export: {export}"


def _fuzz(name: str, cases: int, saved, tmp_path_factory) -> None:
    outcomes = OUTCOMES.setdefault(f"tokenizer {name} ({cases} cases per damage kind)", Outcomes())
    original = (saved / name).read_bytes()
    undamaged = load_tokenizer(str(saved))
    reference, sha256 = _ids(undamaged), tokenizer_sha256(undamaged)
    for strategy in byte_damages(len(original)).values():
        @fuzz_settings(cases)
        @given(damage=strategy)
        def case(damage):
            folder = tmp_path_factory.mktemp("damaged_tok")
            shutil.copytree(saved, folder, dirs_exist_ok=True)
            (folder / name).write_bytes(damage.apply(original))
            outcomes[_check(folder, reference, sha256)] += 1

        case()


@pytest.mark.parametrize("name", FILES)
def test_damaged_tokenizer_files_load_or_stop_in_one_line(name, saved, tmp_path_factory):
    _fuzz(name, max(DEFAULT_CASES // 6, 3), saved, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_damaged_tokenizer_files_slow_tier(name, saved, tmp_path_factory):
    _fuzz(name, SLOW_CASES // 6, saved, tmp_path_factory)
