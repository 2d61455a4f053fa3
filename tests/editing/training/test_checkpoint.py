"""Checkpoint files: Adam's state and the torch RNG round-trip; the state JSON is the commit point."""
from __future__ import annotations

import pytest
import torch

from attrib.backbones.loader import load_backbone
from editing.training.checkpoint import STATE_FILE, load_checkpoint, read_state, save_checkpoint


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    return load_backbone("llava", tiny_dirs["llava"])


def test_round_trip(llava, make_editor, tmp_path):
    editor = make_editor(llava, 0)
    optimizer = torch.optim.Adam(editor.adapter.parameters(), lr=0.01)
    sum(p.square().sum() for p in editor.adapter.parameters()).backward()
    optimizer.step()
    rng = torch.get_rng_state()
    save_checkpoint(tmp_path, editor, optimizer, 1, {"config": {"lr": 0.01}})
    save_checkpoint(tmp_path, editor, optimizer, 2, {"config": {"lr": 0.01}})
    (tmp_path / f".{STATE_FILE}.tmp").write_text("{half a write")  # a kill mid-save leaves this behind
    assert read_state(tmp_path)["step"] == 2 and not (tmp_path / "adapter-step0000001.safetensors").exists()

    other = make_editor(llava, 0)
    fresh = torch.optim.Adam(other.adapter.parameters(), lr=0.5)
    torch.rand(3)  # move the global RNG on
    state = load_checkpoint(tmp_path, other, fresh)
    assert state["config"] == {"lr": 0.01} and torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(editor.adapter.state_dict().values(), other.adapter.state_dict().values()):
        assert torch.equal(a, b)
    mine, theirs = optimizer.state_dict(), fresh.state_dict()
    assert theirs["param_groups"][0]["lr"] == 0.01
    for index, slots in mine["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, theirs["state"][index][name])


def test_missing_state(llava, make_editor, tmp_path):
    editor = make_editor(llava, 0)
    assert read_state(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no training state"):
        load_checkpoint(tmp_path, editor, torch.optim.Adam(editor.adapter.parameters()))
