"""The training run on a tiny backbone: a seed fixes the weights, a killed run resumes to bit-identical
weights, checkpoints are refused or resumed as asked (kills by a real SIGKILL: tests/test_kills.py)."""
from __future__ import annotations

import json

import pytest
import torch

from editing.adapter.vead import VeadConfig
from editing.adapter.visedit import EditPlacement
from editing.training.checkpoint import STATE_FILE
from editing.training.config import TrainConfig
from editing.training.loop import train

FAST = TrainConfig(steps=6, batch_size=2, lr=1e-2, influence_draws=1, checkpoint_every=2)


class Killed(Exception):
    pass


def _weights(editor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in editor.adapter.state_dict().items()}


def test_same_seed_same_weights(llava, records, make_editor):
    config = TrainConfig(steps=3, batch_size=2, lr=1e-2, influence_draws=1)
    runs = []
    for seed in (0, 0, 1):
        editor = make_editor(llava, EditPlacement(-1, (1,), 1))
        train(editor, records, TrainConfig(**{**config.to_json(), "seed": seed}), progress=False)
        runs.append(_weights(editor))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_killed_run_resumes_to_the_same_weights(llava, records, make_editor, tmp_path):
    placement = EditPlacement(0, (1,), 1)
    whole = make_editor(llava, placement)
    train(whole, records, FAST, tmp_path / "whole", progress=False)
    expected = _weights(whole)

    killed = make_editor(llava, placement)

    def kill(step, losses):
        if step == 3:  # after the step-2 checkpoint, before the next one
            raise Killed

    with pytest.raises(Killed):
        train(killed, records, FAST, tmp_path / "killed", progress=False, on_step=kill)
    state = json.loads((tmp_path / "killed" / STATE_FILE).read_text())
    assert state["step"] == 2 and state["seed"] == 0 and state["optimizer"]["param_groups"][0]["lr"] == 1e-2
    assert {"torch"} <= set(state["rng"]) and (tmp_path / "killed" / state["weights"]).is_file()
    with pytest.raises(ValueError, match="resume it"):
        train(killed, records, FAST, tmp_path / "killed", progress=False)

    resumed = make_editor(llava, placement)  # a fresh process would start from a fresh adapter
    result = train(resumed, records, FAST, tmp_path / "killed", resume=True, progress=False)
    assert result.resumed_from == 2 and len(result.history) == 4
    got = _weights(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    files = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert files == ["adapter-step0000006.safetensors", "optimizer-step0000006.safetensors", STATE_FILE]


def test_resume_refuses_other_settings(llava, records, make_editor, tmp_path):
    editor = make_editor(llava, EditPlacement(0, (1,), 1))
    train(editor, records, TrainConfig(**{**FAST.to_json(), "steps": 2}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr: checkpoint 0.01, now 0.5"):
        train(editor, records, TrainConfig(**{**FAST.to_json(), "lr": 0.5}), tmp_path, resume=True, progress=False)


def test_salient_scene_reference_is_kept_across_a_resume(tiny_backbone, records, make_editor, tmp_path):
    config = VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2, scene_gate=True)
    settings = dict(batch_size=2, lr=1e-2, influence_draws=1, scene_reference=2, checkpoint_every=1)
    first = make_editor(tiny_backbone, EditPlacement(-1, (0,), 0), config)
    train(first, records, TrainConfig(steps=2, **settings), tmp_path / "ck", progress=False)
    again = make_editor(tiny_backbone, EditPlacement(-1, (0,), 0), config)
    train(again, records, TrainConfig(steps=3, **settings), tmp_path / "ck", resume=True, progress=False)
    torch.testing.assert_close(again.adapter.scene.reference, first.adapter.scene.reference)
