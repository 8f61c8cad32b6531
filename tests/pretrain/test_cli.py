"""pretrain/cli.py: `distil --help` lists every command, each command's `--help` works, and the commands README
says read --config do (and only those)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from distil.pretrain.cli import COMMANDS, main

CONFIGURED = ("prepare", "train", "evaluate", "finetune", "export")  # README: these read --config and key=value


def test_the_top_level_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.splitlines() if line.startswith("  ") and line.split()}
    assert set(COMMANDS) <= listed, result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    has_option = any(line.strip().startswith("--config ") for line in result.output.splitlines())
    assert has_option == (name in CONFIGURED), result.output
