"""Fuzzing a saved tokenizer (the shard set's tokenizer/ folder, or one given to `distil prepare
--tokenizer`): tokenizer.json and tokenizer_config.json (what a saved fast tokenizer holds) damaged at random. The promise: the
tokenizer loads and works, or loading is one `UserError` line naming the folder; never a traceback."""

from __future__ import annotations

import shutil

import pytest
from conftest_prepare import build_tokenizer
from damage import DEFAULT_CASES, SLOW_CASES, Outcomes, assert_one_line_error, byte_damages, fuzz_settings
from hypothesis import given

from distil.common.errors import UserError
from distil.data_pipeline.prepare.tokenize import load_tokenizer
from distil.pretrain.export import check_tokenizer_source

FILES = ("tokenizer.json", "tokenizer_config.json")
OUTCOMES: dict[str, Outcomes] = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = build_tokenizer(tmp_path_factory.mktemp("tok"))
    yield folder
    for name, outcomes in OUTCOMES.items():
        outcomes.report(name)


def _check(folder) -> str:
    outcomes = []
    for load in (load_tokenizer, check_tokenizer_source):
        try:
            tok = load(str(folder))
        except UserError as error:
            assert_one_line_error(error, str(folder))
            outcomes.append("error")
        else:
            if tok is not None:
                tok("a short line of text")  # a tokenizer that loads also works
            outcomes.append("loads")
    return "/".join(outcomes)


def _fuzz(name: str, cases: int, saved, tmp_path_factory) -> None:
    outcomes = OUTCOMES.setdefault(f"tokenizer {name} ({cases} cases per damage kind)", Outcomes())
    original = (saved / name).read_bytes()
    for strategy in byte_damages(len(original)).values():
        @fuzz_settings(cases)
        @given(damage=strategy)
        def case(damage):
            folder = tmp_path_factory.mktemp("damaged_tok")
            shutil.copytree(saved, folder, dirs_exist_ok=True)
            (folder / name).write_bytes(damage.apply(original))
            outcomes[_check(folder)] += 1

        case()


@pytest.mark.parametrize("name", FILES)
def test_damaged_tokenizer_files_load_or_stop_in_one_line(name, saved, tmp_path_factory):
    _fuzz(name, max(DEFAULT_CASES // 6, 3), saved, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_damaged_tokenizer_files_slow_tier(name, saved, tmp_path_factory):
    _fuzz(name, SLOW_CASES // 6, saved, tmp_path_factory)
