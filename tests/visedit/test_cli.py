"""The `visedit` command line: one console script, every subcommand listed, defaults named in --help,
errors in one line, one run at a time per output folder."""
from __future__ import annotations

import subprocess
import sys

import pytest

from attrib.io import REPOSITORY
from visedit.cli import COMMANDS, main, parser


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in ("world", "heatmaps", "validate", "edit", "compare", "caption-tokens", "scenes", "bench",
                 "train-defaults", "convert-minigpt4"):
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


HOLDER = """
import sys, time
from attrib.io import OutputLock
held = [OutputLock(path[1:], beside=True).__enter__() if path.startswith("^") else OutputLock(path).__enter__()
        for path in sys.argv[1:]]
print("ready", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_output_is_refused_in_one_line(tmp_path, capsys):
    """Another process writes into each command's output (its lock held): the command refuses at once,
    printing one line that names the folder and that process, and exits 2."""
    out = {name: tmp_path / name for name in ("heatmaps", "validate", "edit", "compare", "captions", "bench", "smoke",
                                              "work", "world", "scenes.json")}
    beside = ("world", "scenes.json")  # built elsewhere and renamed into place / a single file
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *[("^" if name in beside else "") + str(path)
                                                               for name, path in out.items()]],
                              stdout=subprocess.PIPE, text=True, cwd=REPOSITORY)
    try:
        assert holder.stdout.readline().strip() == "ready"
        data = ["--data", str(tmp_path / "never-read.json")]
        files = ["--train", str(tmp_path / "t.json"), "--eval", str(tmp_path / "e.json")]
        runs = {"heatmaps": ["heatmaps", *data], "validate": ["validate", *data], "edit": ["edit", *files],
                "compare": ["compare", "--methods", "none", *files],
                "captions": ["caption-tokens", "--methods", "none", *files], "bench": ["bench", "--quick"],
                "smoke": ["smoke-full"], "work": ["train-defaults", "--out", str(tmp_path / "models")],
                "world": ["world", "--seed", "0"], "scenes.json": ["scenes", *data]}
        for name, argv in runs.items():
            flag = "--work" if name == "work" else "--out"
            assert main([*argv, flag, str(out[name]), "--no-progress"]) == 2, name
            err = capsys.readouterr().err.strip()
            assert err == (f"error: {out[name]}: another run (pid {holder.pid}) is writing here; wait for it to "
                           f"end or choose another output folder"), name
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "models").exists() and not (tmp_path / "world").exists()  # nothing was written


def test_set_reads_numbers_and_yaml_and_refuses_a_malformed_pair(capsys):
    args = parser().parse_args(["compare", "--set", "ft_l.norm_constraint=4e-4", "--set", "tp.steps=20",
                                "--set", "tp.memory_fields=[src]", "--set", "tp.neurons=edit"])
    assert args.overrides == [("ft_l", "norm_constraint", 4e-4), ("tp", "steps", 20), ("tp", "memory_fields", ["src"]),
                              ("tp", "neurons", "edit")]
    for bad in ("ft_l=3", "ft_l.steps", ".steps=3", "ft_l.steps="):
        with pytest.raises(SystemExit):
            parser().parse_args(["compare", "--set", bad])
        assert "expected METHOD.KEY=VALUE" in capsys.readouterr().err
