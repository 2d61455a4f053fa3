"""The `visedit` command line: one console script, every subcommand listed, defaults named in --help."""
from __future__ import annotations

import pytest

from visedit.cli import COMMANDS, main, parser


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in ("world", "heatmaps", "validate", "edit", "scenes", "bench", "train-defaults", "convert-minigpt4"):
        assert name in out and name in COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_names_its_defaults(name, capsys):
    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text wraps anywhere
    assert "--no-progress" in out
    if name in ("heatmaps", "validate", "edit", "scenes"):
        assert "(default: llava)" in out  # --backbone
        assert "default: the shipped default of --backbone" in out
    if name in ("heatmaps", "validate", "edit"):
        assert "--seed SEED" in out and "(default: 0)" in out


def test_outputs_go_under_runs_unless_out_says_otherwise():
    args = parser().parse_args(["heatmaps"])
    assert args.out is None  # runs/heatmaps/<backbone>, see attrib.commands.heatmaps
    args = parser().parse_args(["train-defaults"])
    assert str(args.out).startswith("runs/")


def test_errors_print_one_line_and_exit_2(tmp_path, capsys):
    assert main(["heatmaps", "--data", str(tmp_path / "missing.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1
