"""The CLI surface: every command has --help with an example; the design's command groups are listed."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from archipelago.cli import app

runner = CliRunner()

COMMANDS = [["data", "prepare"], ["train"], ["train-expert"], ["train-router"], ["generate"], ["eval"],
            ["cluster", "up"], ["cluster", "status"], ["cluster", "down"], ["cluster", "local"],
            ["cluster", "cleanup"], ["quickstart"], ["serve"]]


def test_root_help_lists_command_groups():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for group in ("data", "train", "train-expert", "train-router", "generate", "eval", "cluster"):
        assert group in res.output


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_has_help_with_example(cmd):
    res = runner.invoke(app, [*cmd, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "Example" in res.output, res.output


@pytest.mark.e2e
def test_console_script_runs(cli):
    res = cli("--help")
    assert res.returncode == 0 and "archipelago" in res.stdout
