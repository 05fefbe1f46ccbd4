"""The `vlora-hf` console script: every subcommand answers --help with its own usage line."""

from __future__ import annotations

import pytest

from vlora_hf import cli


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: vlora-hf {name}")


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert f"\n  {name} " in out


def test_unknown_command_is_one_clear_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
