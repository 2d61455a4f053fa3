"""Training checkpoints that survive a kill at any moment.

A checkpoint folder holds, for the last completed save at step N:

    adapter-step000000N.safetensors     adapter weights (the `VisEditEditor.save_weights` format)
    optimizer-step000000N.safetensors   Adam's per-parameter tensors (exp_avg, exp_avg_sq, step)
    train_state.json                    step, config, RNG states, Adam's param groups, file names, losses

Each file is written to a temporary name and renamed into place; ``train_state.json`` is renamed last
and is the commit point: a run killed mid-save leaves the previous state file pointing at the previous,
complete pair of tensor files (older pairs are deleted only after the new state is in place). Adam's
tensors go to safetensors rather than JSON (millions of floats); everything else is JSON.

RNG: the trainer draws all its randomness from generators seeded by (seed, stream, step / epoch /
record), so the step number alone restores it; the state also records the global torch RNG state
(restored on resume) for anything outside the trainer that may draw from it.

Reading back checks everything before restoring anything: the state's fields and the files it names,
the adapter weights against the editor, Adam's tensors and param groups against the optimizer, the RNG
state's size; anything malformed raises `attrib.errors.ArtifactError` naming the file and field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from attrib.artifact import optimizer_state, optimizer_tensors, rng_state, rng_text
from attrib.errors import ArtifactError
from attrib.io import atomic_write, atomic_write_json, read_json, read_safetensors, require
from editing.adapter.visedit import VisEditEditor

STATE_FILE = "train_state.json"
STATE_FORMAT = "visedit-train/1"


def save_checkpoint(folder: str | Path, editor: VisEditEditor, optimizer: torch.optim.Optimizer, step: int,
                    info: dict[str, Any]) -> Path:
    """Write the checkpoint of ``step`` (module docstring); ``info`` (config, losses, ...) goes into the
    state JSON. Returns the state file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = f"adapter-step{step:07d}.safetensors"
    moments = f"optimizer-step{step:07d}.safetensors"
    editor.save_weights(folder / weights)  # atomic itself
    tensors, groups = optimizer_tensors(optimizer)
    atomic_write(folder / moments, lambda p: save_file(tensors, str(p)))
    state = {"format": STATE_FORMAT, "step": step, **info, "weights": weights,
             "optimizer": {"file": moments, "param_groups": groups}, "rng": {"torch": rng_text()}}
    atomic_write_json(folder / STATE_FILE, state, indent=1)
    for old in [*folder.glob("adapter-step*.safetensors"), *folder.glob("optimizer-step*.safetensors")]:
        if old.name not in (weights, moments):
            old.unlink(missing_ok=True)
    return folder / STATE_FILE


def _file(state: dict, key: str, folder: Path, where: str) -> str:
    """A file name the state holds, checked to be a bare name of a file present in ``folder``."""
    name = require(state, key, str, where)
    if Path(name).name != name or name in ("", ".", ".."):
        raise ArtifactError(f"{where}, field {key!r}: {name!r} is not a file name in the checkpoint folder")
    if not (folder / name).is_file():
        raise ArtifactError(f"{where}, field {key!r}: {folder / name} is missing; the checkpoint is incomplete")
    return name


def read_state(folder: str | Path) -> dict[str, Any] | None:
    """The committed state of a checkpoint folder, or None when there is none. A state that is not a
    VisEdit training state, has fields of the wrong type, or names files that are not there raises
    `ArtifactError` naming ``train_state.json`` and the field."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.exists():
        return None
    state = read_json(path, "VisEdit training state")
    where = str(path)
    if require(state, "format", str, where, default=None) != STATE_FORMAT:
        raise ArtifactError(f"{path}: not a VisEdit training state (format {state.get('format')!r}, "
                            f"expected {STATE_FORMAT!r})")
    if require(state, "step", int, where) < 0:
        raise ArtifactError(f"{path}, field 'step': {state['step']}; expected a step number ≥ 0")
    require(state, "config", dict, where, default={})
    require(state, "train_s", float, where, default=0.0)
    _file(state, "weights", folder, where)
    optimizer = require(state, "optimizer", dict, where)
    _file(optimizer, "file", folder, f"{path}, in 'optimizer'")
    require(optimizer, "param_groups", list, f"{path}, in 'optimizer'")
    rng = require(state, "rng", dict, where, default={})
    if "torch" in rng:
        rng_state(rng["torch"], f"{path}, in 'rng', field 'torch'")
    return state


def load_checkpoint(folder: str | Path, editor: VisEditEditor, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore adapter weights, Adam's state and the torch RNG from the committed checkpoint; returns the
    state JSON. Everything is checked before anything is restored: weights made for another placement or
    adapter size (`load_weights`), optimizer tensors or param groups that do not fit ``optimizer``, a
    malformed RNG state, or no state at all raise `ArtifactError`."""
    folder = Path(folder)
    state = read_state(folder)
    if state is None:
        raise ArtifactError(f"{folder / STATE_FILE}: no training state to resume from")
    path = folder / state["optimizer"]["file"]
    tensors, _ = read_safetensors(path, "optimizer state file")
    moments = optimizer_state(tensors, state["optimizer"]["param_groups"], optimizer, path,
                              f"{folder / STATE_FILE}, in 'optimizer'")
    rng = state.get("rng", {})
    generator = rng_state(rng["torch"], f"{folder / STATE_FILE}, in 'rng'") if "torch" in rng else None
    editor.load_weights(folder / state["weights"])
    optimizer.load_state_dict(moments)
    if generator is not None:
        torch.set_rng_state(generator)
    return state
