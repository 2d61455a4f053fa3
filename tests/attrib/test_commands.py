"""The attribution commands through the `visedit` command line: world, heatmaps, validate, train-defaults."""
import json
import subprocess
import sys

from visedit.cli import main


def test_world_writes_a_world_with_counts_for_both_kinds(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["world", "--seed", "1", "--out", str(out), "--n-train", "5", "--n-eval", "3"]) == 0
    assert len(json.loads((out / "vqa_train.json").read_text())) == 5
    assert len(json.loads((out / "caption_train.json").read_text())) == 5
    assert len(json.loads((out / "caption_eval.json").read_text())) == 3
    assert "wrote world seed=1" in capsys.readouterr().out


def test_world_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["world", "--seed", "0", "--out", str(blocker / "w"), "--n-train", "1", "--n-eval", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["world", "--seed", "0", "--out", str(out), "--n-train", "1", "--n-eval", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--overwrite" in err and err.count("\n") == 1
    assert main(["world", "--seed", "-2", "--out", str(tmp_path / "neg")]) == 2


def test_module_entry_point(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "visedit", "world", "--seed", "0", "--out", str(tmp_path / "w"), "--n-train", "1",
         "--n-eval", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "w" / "truth.json").is_file()


def test_train_defaults_names_an_unknown_default(capsys):
    assert main(["train-defaults", "--backbones", "llava,gpt", "--eval-only"]) == 2
    assert "unknown default 'gpt'; choose from llava, minigpt4, blip2" in capsys.readouterr().err
