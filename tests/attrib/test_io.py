"""Atomic writes, writable output folders, and paths stored relative to the repository."""
from __future__ import annotations

from pathlib import Path

import pytest

from attrib.io import REPOSITORY, atomic_write, atomic_write_text, stored_path, writable_dir


def test_atomic_write_leaves_no_partial_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"  # the reader still sees the complete old file
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and not list(tmp_path.glob(".out.json.tmp"))


def test_writable_dir_creates_the_folder_and_names_it_when_it_cannot(tmp_path):
    assert writable_dir(tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"file/sub: output folder cannot be written"):
        writable_dir(blocker / "sub")


def test_stored_paths_are_relative_inside_the_repository_and_unchanged_outside(tmp_path, monkeypatch):
    assert stored_path(REPOSITORY / "attrib" / "defaults" / "models" / "llava") == "attrib/defaults/models/llava"
    monkeypatch.chdir(REPOSITORY)
    assert stored_path("runs/world/vqa_eval.json") == "runs/world/vqa_eval.json"
    assert stored_path(tmp_path / "x") == str(tmp_path / "x")
    assert stored_path(None) is None
