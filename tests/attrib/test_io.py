"""Atomic writes (files, figures, folders) that survive a kill, output locks, writable output folders,
and paths stored relative to the repository."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attrib.errors import OutputBusy
from attrib.io import (
    DEAD_HOLDER_S,
    REPOSITORY,
    OutputLock,
    atomic_folder,
    atomic_savefig,
    atomic_write,
    atomic_write_text,
    stored_path,
    writable_dir,
)


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


# ---- kills, figures, folders, locks --------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from attrib.io import OutputLock, atomic_write
kind, target = sys.argv[1], Path(sys.argv[2])

def half(tmp):
    Path(tmp).write_text("half of the new")
    print("ready", flush=True)
    time.sleep(60)

if kind == "write":
    atomic_write(target, half)
elif kind == "dead":  # hold the lock under a dead process's pid for a moment (a lock the kernel is releasing)
    held = OutputLock(target).__enter__()
    (target / ".visedit.lock").write_text(sys.argv[3])
    print("ready", flush=True)
    time.sleep(0.5)
else:
    held = OutputLock(target, beside=kind == "beside").__enter__()
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder():
    """``holder(kind, path)``: a child process that stops half-way through an atomic write of ``path``
    ("write") or holds its lock ("lock", "beside"); returns the process once it is there."""
    started = []

    def start(kind: str, path: Path, *more: str) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path), *more], stdout=subprocess.PIPE,
                                 text=True, cwd=REPOSITORY)
        started.append(child)
        assert child.stdout.readline().strip() == "ready"
        return child

    yield start
    for child in started:
        child.kill()
        child.wait()


def test_a_write_killed_half_way_leaves_the_old_file(tmp_path, holder):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    child = holder("write", target)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert target.read_text() == "old"  # the half-written bytes are only under the hidden temporary name
    assert [p.name for p in tmp_path.iterdir() if p.name != target.name] == [f".results.json.{child.pid}.tmp"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_figures_are_written_atomically_in_the_format_of_their_name(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, _ = plt.subplots(figsize=(1, 1))
    path = atomic_savefig(figure, tmp_path / "bars.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # not the format a ".tmp" name would choose
    assert atomic_savefig(figure, tmp_path / "bars.pdf").read_bytes()[:4] == b"%PDF"
    figure.savefig = lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full"))
    with pytest.raises(OSError):
        atomic_savefig(figure, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "bars.pdf", "bars.png"]
    plt.close(figure)


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "world"
    with atomic_folder(out) as tmp:
        (tmp / "a.json").write_text("1")
        assert not out.exists() and tmp.parent == tmp_path and tmp.name.startswith(".world.partial-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"] and (out / "a.json").read_text() == "1"
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        with atomic_folder(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(out, replace=True) as tmp:
            (tmp / "b.json").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]  # the old folder, untouched
    (tmp_path / ".world.partial-left-by-a-kill").mkdir()
    (tmp_path / ".world.old-12345").mkdir()  # killed between renaming the old folder aside and removing it
    with atomic_folder(out, replace=True) as tmp:
        (tmp / "b.json").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # the stale folders are gone


def test_a_second_process_is_refused_the_output_folder_until_the_first_dies(tmp_path, holder):
    out = tmp_path / "runs" / "heatmaps"
    child = holder("lock", out)
    with pytest.raises(OutputBusy, match=rf"heatmaps: another run \(pid {child.pid}\) is writing here") as refused:
        with OutputLock(out):
            pass
    assert "\n" not in str(refused.value)
    os.kill(child.pid, signal.SIGKILL)  # the kernel drops a dead process's lock: no stale lock to clear
    child.wait()
    with OutputLock(out):
        assert (out / ".visedit.lock").read_text() == f"{os.getpid()}\n"
        with OutputLock(out):  # the same process may take it again (a command and its pipeline)
            pass
        assert (out / ".visedit.lock").is_file()
    assert list(out.iterdir()) == []  # the lock file goes with the lock
    with OutputLock(tmp_path / "never-written"):
        pass
    assert not (tmp_path / "never-written").exists()  # a folder the lock created is removed while still empty


def test_a_lock_beside_a_folder_or_file_does_not_create_it(tmp_path, holder):
    out = tmp_path / "world"
    child = holder("beside", out)
    assert not out.exists() and (tmp_path / ".world.visedit.lock").read_text().strip() == str(child.pid)
    with pytest.raises(OutputBusy, match="world: another run"):
        with atomic_folder(out):
            pass
    child.kill()
    child.wait()
    with atomic_folder(out) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_a_lock_whose_holder_has_died_is_waited_for_not_reported(tmp_path, holder):
    """The kernel drops a killed process's lock a moment after it is gone: a lock still held under a dead
    pid is waited for (up to `DEAD_HOLDER_S`) instead of refusing the run."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder("dead", tmp_path, str(dead.pid))
    began = time.monotonic()
    with OutputLock(tmp_path):
        assert 0.2 < time.monotonic() - began < DEAD_HOLDER_S
