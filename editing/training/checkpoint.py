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
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from attrib.io import atomic_write
from editing.adapter.visedit import VisEditEditor

STATE_FILE = "train_state.json"
STATE_FORMAT = "visedit-train/1"


def _rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _restore_rng(state: dict[str, str]) -> None:
    if "torch" in state:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, slots in state["state"].items() for name, value in slots.items()
               if isinstance(value, torch.Tensor)}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}  # betas: JSON list
              for group in state["param_groups"]]
    return tensors, groups


def save_checkpoint(folder: str | Path, editor: VisEditEditor, optimizer: torch.optim.Optimizer, step: int,
                    info: dict[str, Any]) -> Path:
    """Write the checkpoint of ``step`` (module docstring); ``info`` (config, losses, ...) goes into the
    state JSON. Returns the state file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = f"adapter-step{step:07d}.safetensors"
    moments = f"optimizer-step{step:07d}.safetensors"
    editor.save_weights(folder / weights)  # atomic itself
    tensors, groups = _optimizer_tensors(optimizer)
    atomic_write(folder / moments, lambda p: save_file(tensors, str(p)))
    state = {"format": STATE_FORMAT, "step": step, **info, "weights": weights,
             "optimizer": {"file": moments, "param_groups": groups}, "rng": _rng_state()}
    atomic_write(folder / STATE_FILE, lambda p: Path(p).write_text(json.dumps(state, indent=1) + "\n"))
    for old in [*folder.glob("adapter-step*.safetensors"), *folder.glob("optimizer-step*.safetensors")]:
        if old.name not in (weights, moments):
            old.unlink(missing_ok=True)
    return folder / STATE_FILE


def read_state(folder: str | Path) -> dict[str, Any] | None:
    """The committed state of a checkpoint folder, or None when there is none."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a VisEdit training state (format {state.get('format')!r})")
    return state


def load_checkpoint(folder: str | Path, editor: VisEditEditor, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore adapter weights, Adam's state and the torch RNG from the committed checkpoint; returns the
    state JSON. Weights made for another placement or adapter size are refused by `load_weights`."""
    folder = Path(folder)
    state = read_state(folder)
    if state is None:
        raise FileNotFoundError(f"{folder / STATE_FILE}: no training state to resume from")
    editor.load_weights(folder / state["weights"])
    tensors = load_file(str(folder / state["optimizer"]["file"]))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    device = next(editor.adapter.parameters()).device
    optimizer.load_state_dict({"state": {i: {k: v.to(device) if k != "step" else v for k, v in s.items()}
                                         for i, s in slots.items()},
                               "param_groups": state["optimizer"]["param_groups"]})
    _restore_rng(state.get("rng", {}))
    return state
