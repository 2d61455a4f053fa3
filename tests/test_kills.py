"""Runs killed at any moment (a real SIGKILL) resume to the result of an uninterrupted run: VisEdit
training (also killed inside a checkpoint write), `visedit heatmaps` (attribution chunks), and `visedit
compare` (per method; a killed comparison takes its running method down with it).

Each run is a child process forked from a server that imported torch and the toolkit once (the
``forkserver`` start method), so a kill costs a fork, not an interpreter start. Kill moments are drawn
from a seeded generator and printed (``pytest -s`` shows them): either inside a drawn file write (the
child stops for good between writing the temporary file and renaming it, `_hold_renames`) or at a drawn
moment after a drawn step / chunk (the child sleeps a little after each, so a parent short of CPU still
kills it mid-run); a kill that lands after the run ended fails the test rather than passing unkilled.
Every run uses the same torch thread count: bit-identical weights are promised on the same machine and
thread count.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attrib.world import write_world

THREADS = 1
SEED = 20240611  # the kill moments' draw


@pytest.fixture(scope="module")
def forks():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "attrib.attribution", "editing.training.loop",
                                    "editing.command.compare", "visedit.cli", __name__])
    return context


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("kills") / "world", seed=0, n_train=8, n_eval=3, n_caption_train=1,
                       n_caption_eval=1)


def _child(job, *args) -> None:
    from tqdm import tqdm
    from transformers.utils import logging

    torch.set_num_threads(THREADS)
    tqdm.set_lock(threading.RLock())  # not a multiprocessing lock: a killed run would leak its semaphore
    logging.disable_progress_bar()
    code = job(*args)
    sys.stdout.flush()
    os._exit(code or 0)


def run(forks, job, *args, kill_when=None, delay: float = 0.0, timeout: float = 300.0) -> int:
    """Run ``job(*args)`` in a forked child; with ``kill_when`` (a callable of the child's pid), SIGKILL it
    ``delay`` seconds after that returns true. Returns the exit code (−9 when killed)."""
    child = forks.Process(target=_child, args=(job, *args))
    child.start()
    if kill_when is not None:
        deadline = time.monotonic() + timeout
        while not kill_when(child.pid):
            assert child.is_alive(), f"the run ended (exit code {child.exitcode}) before its kill moment"
            assert time.monotonic() < deadline, "the kill moment never came"
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
    child.join(timeout)
    assert child.exitcode is not None, "the run did not end"
    return child.exitcode


def _hold_renames(match: str, marker: Path, pause_at: int | None = None, slow: float = 0.0) -> None:
    """In a child: every rename into place (`atomic_write`'s last act) of a path containing ``match`` is
    counted; at the ``pause_at``-th the child writes ``marker`` and stops for good, its bytes written under
    the temporary name (a kill then lands inside the write); after each other one it sleeps ``slow`` s, so
    a parent starved of CPU still finds the run going when it kills at a drawn moment."""
    replace, seen = os.replace, []

    def held(src, dst, *args, **kwargs):
        if match not in str(dst):
            return replace(src, dst, *args, **kwargs)
        seen.append(dst)
        if len(seen) == pause_at:
            marker.write_text(Path(dst).name)
            time.sleep(600)
        replace(src, dst, *args, **kwargs)
        time.sleep(slow)

    os.replace = held


def _same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left), a.name


# ---- (a) training ----------------------------------------------------------------------------------------

STEPS = 10


def _train_job(model: str, world: str, folder: str, pause: str | None) -> int:
    """Train (resuming what ``folder/checkpoint`` holds) and save the final weights; report each step in
    ``folder/progress``. ``pause`` ("<file name>@<n>"): stop for good just before the n-th rename of that
    file into place, i.e. inside `save_checkpoint`; "slow": sleep a little after each step."""
    from attrib.backbones.loader import load_backbone
    from attrib.data import load_records
    from attrib.io import atomic_write_text
    from editing.adapter.vead import VeadConfig
    from editing.adapter.visedit import EditPlacement, VisEditEditor
    from editing.training.config import TrainConfig
    from editing.training.loop import train

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if pause == "slow":
        _hold_renames(f"{folder}/progress", folder / "paused", slow=0.1)
    elif pause is not None:
        name, nth = pause.split("@")
        _hold_renames(f"/{name}", folder / "paused", pause_at=int(nth))
    backbone = load_backbone("llava", model)
    editor = VisEditEditor(backbone, EditPlacement(0, (1,), 1), VeadConfig(mid_dim=16, n_heads=2, im_hidden=16,
                                                                           im_heads=2))
    config = TrainConfig(steps=STEPS, batch_size=2, lr=1e-2, influence_draws=1, checkpoint_every=1)
    train(editor, load_records(Path(world) / "vqa_train.json"), config, folder / "checkpoint", resume=True,
          progress=False, on_step=lambda step, _: atomic_write_text(folder / "progress", str(step)))
    editor.save_weights(folder / "final.safetensors")
    return 0


def _committed(folder: Path) -> int:
    state = folder / "checkpoint" / "train_state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def _progress(folder: Path) -> int:
    return int((folder / "progress").read_text()) if (folder / "progress").is_file() else 0


def test_training_killed_three_times_resumes_to_the_weights_of_an_uninterrupted_run(forks, world, tiny_dirs, tmp_path):
    model = str(tiny_dirs["llava"])
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(forks, _train_job, model, str(world), str(whole), None) == 0

    rng = np.random.default_rng(SEED)
    # Kill 1: inside the checkpoint write of step p, the new adapter file in place, Adam's tensors not yet.
    p = int(rng.integers(2, 4))
    assert run(forks, _train_job, model, str(world), str(killed), f"optimizer-step@{p}",
               kill_when=lambda pid: (killed / "paused").is_file()) == -signal.SIGKILL
    files = sorted(f.name for f in (killed / "checkpoint").iterdir())
    assert _committed(killed) == p - 1 and f"adapter-step{p:07d}.safetensors" in files  # written, not committed
    assert f"optimizer-step{p - 1:07d}.safetensors" in files  # the committed pair is still whole
    # Kill 2: inside the write of the state file itself (the commit point) of a later step.
    (killed / "paused").unlink()
    q = _committed(killed) + int(rng.integers(2, 4))
    assert run(forks, _train_job, model, str(world), str(killed), f"train_state.json@{q - p + 1}",
               kill_when=lambda pid: (killed / "paused").is_file()) == -signal.SIGKILL
    assert _committed(killed) == q - 1
    # Kill 3: at a drawn moment after a drawn step: mid-step or mid-save, wherever it lands.
    step, delay = _committed(killed) + int(rng.integers(1, 3)), float(rng.uniform(0.0, 0.2))
    print(f"training kills: in the optimizer write of step {p}, in the state write of step {q}, "
          f"{delay:.3f} s after step {step}")
    assert run(forks, _train_job, model, str(world), str(killed), "slow",
               kill_when=lambda pid: _progress(killed) >= step, delay=delay) == -signal.SIGKILL
    assert _committed(killed) < STEPS and not (killed / "final.safetensors").exists()

    assert run(forks, _train_job, model, str(world), str(killed), None) == 0
    _same_tensors(killed / "final.safetensors", whole / "final.safetensors")
    assert sorted(f.name for f in (killed / "checkpoint").iterdir()) == [
        f"adapter-step{STEPS:07d}.safetensors", f"optimizer-step{STEPS:07d}.safetensors", "train_state.json"]


# ---- (b) attribution -------------------------------------------------------------------------------------

def _heatmaps_job(model: str, data: str, out: str, cwd: str | None = None, pause_at: int | None = None) -> int:
    """`visedit heatmaps` on 3 records, one per chunk; with ``pause_at``, stopped inside the write of that
    chunk (`_hold_renames`), else slowed a little after each chunk."""
    from visedit.cli import main

    if cwd is not None:
        os.chdir(cwd)
    else:
        _hold_renames(f"{out}/work/", Path(out).parent / "paused", pause_at=pause_at, slow=0.05)
    return main(["heatmaps", "--backbone", "llava", "--model", model, "--data", data, "--n", "3",
                 "--batch-size", "1", "--out", out, "--no-progress"])


def _chunks(out: Path) -> dict[str, int]:
    """The finished chunks in ``out/work`` (name → mtime_ns)."""
    return {p.name: p.stat().st_mtime_ns for p in (out / "work").glob("*/*.safetensors")}


def _tree(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def heatmaps_whole(forks, world, tiny_dirs, tmp_path_factory):
    """An uninterrupted `visedit heatmaps` run, from a working folder of its own: (out, files before,
    files after) of that folder, and the world and model folders before and after."""
    cwd = tmp_path_factory.mktemp("cwd")
    (cwd / "notes.txt").write_text("a user's file")
    watched = [cwd, world, Path(tiny_dirs["llava"])]
    before = [_tree(root) for root in watched]
    out = cwd / "out"
    assert run(forks, _heatmaps_job, str(tiny_dirs["llava"]), str(world / "vqa_eval.json"), "out", str(cwd)) == 0
    return out, before, [_tree(root) for root in watched]


def test_heatmaps_write_only_under_their_out(heatmaps_whole):
    out, before, after = heatmaps_whole
    new = {path for path in after[0] if path not in before[0]}
    assert new and all(path.startswith("out/") for path in new), sorted(new)
    assert {path for path in before[0] if after[0].get(path) != before[0][path]} == set()  # nothing else changed
    assert before[1:] == after[1:]  # the data and the model are only read
    assert not (out / "work").exists() and not (out / ".visedit.lock").exists()  # no working files left


def test_heatmaps_killed_twice_resume_to_the_artifact_of_an_uninterrupted_run(forks, world, tiny_dirs, tmp_path,
                                                                             heatmaps_whole):
    whole = heatmaps_whole[0]
    out, args = tmp_path / "out", (str(tiny_dirs["llava"]), str(world / "vqa_eval.json"))
    rng = np.random.default_rng(SEED + 1)
    # Kill 1: inside the write of a drawn chunk (its bytes under the temporary name).
    first = int(rng.integers(2, 6))
    assert run(forks, _heatmaps_job, *args, str(out), None, first,
               kill_when=lambda pid: (tmp_path / "paused").is_file()) == -signal.SIGKILL
    kept, partial = _chunks(out), list((out / "work").glob("*/.*.tmp"))
    assert len(kept) == first - 1 and len(partial) == 1
    # Kill 2: at a drawn moment after a drawn number of chunks.
    wanted, delay = len(kept) + int(rng.integers(2, 5)), float(rng.uniform(0.0, 0.05))
    print(f"heatmaps kills: inside the write of chunk {first}, {delay:.3f} s after chunk {wanted}")
    assert run(forks, _heatmaps_job, *args, str(out), kill_when=lambda pid: len(_chunks(out)) >= wanted,
               delay=delay) == -signal.SIGKILL
    chunks = _chunks(out)
    assert not (out / "attribution.json").exists() and len(chunks) >= wanted
    assert all(chunks[name] == stamp for name, stamp in kept.items())  # reused, not computed again
    assert not partial[0].exists()  # the first kill's half-written chunk was cleared, and the chunk made again
    assert run(forks, _heatmaps_job, *args, str(out)) == 0
    assert json.loads((out / "attribution.json").read_text()) == json.loads((whole / "attribution.json").read_text())
    _same_tensors(out / "attribution.safetensors", whole / "attribution.safetensors")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())


# ---- (c) compare -----------------------------------------------------------------------------------------

def _compare_options(world: Path, model: Path, out: Path):
    from editing.command.compare import CompareOptions

    return CompareOptions(backbone="blip2", model=model, train=world / "vqa_train.json", eval=world / "vqa_eval.json",
                          dev_n=2, n_dev=2, n_test=2, out=out, methods=("none", "lookup"), progress=False)


def _compare_job(world: str, model: str, out: str, pause: bool = False) -> int:
    """`run_compare` of none and lookup; with ``pause``, lookup's process stops inside the write of its
    results file (`_hold_renames`; the method processes are forks of this one and inherit it)."""
    from editing.command import compare

    compare.METHOD_START = "fork"  # this process has imported everything already: no interpreter start per method
    if pause:
        _hold_renames("/methods/lookup.json", Path(out).parent / "paused", pause_at=1)
    compare.run_compare(_compare_options(Path(world), Path(model), Path(out)))
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith(("Z", "X"))
    except OSError:
        return True


def _measured(result: dict) -> dict:
    """``result`` without what is timed or machine-dependent (or how it was timed: ``latency_jobs``)."""
    timed = ("_s", "_ms", "inference_overhead", "peak_mem_mb", "threads", "_jobs")
    return {k: _measured(v) if isinstance(v, dict) else v for k, v in result.items() if not k.endswith(timed)}


def test_compare_killed_mid_way_resumes_at_the_next_method(forks, world, tiny_dirs, tmp_path):
    from editing.command.compare import run_method

    out, model = tmp_path / "out", tiny_dirs["blip2"]
    done = out / "methods" / "none.json"
    delay = float(np.random.default_rng(SEED + 2).uniform(0.0, 0.5))
    print(f"compare kill: {delay:.3f} s after lookup's process stopped inside the write of its results")
    running: list[int] = []

    def lookup_writing(pid: int) -> bool:
        running[:] = _children(pid)  # lookup's process, which must die with the comparison
        return (tmp_path / "paused").is_file()

    assert run(forks, _compare_job, str(world), str(model), str(out), True, kill_when=lookup_writing,
               delay=delay) == -signal.SIGKILL
    assert running and all(_wait(lambda pid=pid: _gone(pid)) for pid in running)
    assert done.is_file() and not (out / "methods" / "lookup.json").exists() and not (out / "results.json").exists()
    stamp = done.stat().st_mtime_ns

    assert run(forks, _compare_job, str(world), str(model), str(out)) == 0
    assert done.stat().st_mtime_ns == stamp  # finished before the kill: not run again
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["none", "lookup"]
    # "lookup", killed mid-way and run again, gives what an uninterrupted run of it gives.
    whole = json.loads(json.dumps(run_method(_compare_options(world, model, out), "lookup"), default=str))
    assert _measured(results["methods"]["lookup"]) == _measured(whole)


def _wait(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
