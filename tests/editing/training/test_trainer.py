"""Training steps on a tiny backbone: the loss falls, locality partners and target roles are drawn from the
seed, a step in parts gives the one-pass gradient, and a NaN or infinite loss stops the run before it
reaches a checkpoint."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from attrib.backbones.loader import load_backbone
from attrib.errors import TrainingDiverged
from editing.adapter.scenes import visual_states
from editing.adapter.split import SplitForward
from editing.adapter.vead import VeadConfig
from editing.adapter.visedit import EditPlacement
from editing.inputs import target_lengths
from editing.training import losses
from editing.training.checkpoint import STATE_FILE
from editing.training.config import TrainConfig
from editing.training.examples import example_rows
from editing.training.loop import train
from editing.training.trainer import Trainer, reset_adapter

FAST = TrainConfig(steps=6, batch_size=2, lr=1e-2, influence_draws=1, checkpoint_every=2)


def _weights(editor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in editor.adapter.state_dict().items()}


def test_loss_decreases(tiny_backbone, records, make_editor):
    editor = make_editor(tiny_backbone, EditPlacement(0, (1,), 1))
    result = train(editor, records, TrainConfig(steps=10, batch_size=2, lr=1e-2, influence_draws=1), progress=False)
    totals = [h["loss"] for h in result.history]
    assert len(totals) == 10 and sum(totals[-2:]) < sum(totals[:2])
    assert {"rel", "t_gen", "m_gen", "loc", "align", "up", "down"} <= set(result.history[0])
    assert not editor.is_edited and not any(p.requires_grad for p in tiny_backbone.model.parameters())


def test_locality_partners_are_other_records_drawn_per_step(llava, records, make_editor):
    editor = make_editor(llava, EditPlacement(0, (1,), 1))
    trainer = Trainer(editor, records, TrainConfig(batch_size=2, loc_partners=2, influence_draws=1))
    draws = {step: trainer.partner_indices(step, trainer.batch_indices(step)) for step in range(1, 9)}
    for step, partners in draws.items():
        own = trainer.batch_indices(step)
        assert len(partners) == 2 and all(len(row) == len(own) for row in partners)
        assert all(p != i and 0 <= p < len(records) for row in partners for p, i in zip(row, own))
        assert trainer.partner_indices(step, own) == partners  # a step's draw is fixed by its number
    assert len({str(p) for p in draws.values()}) > 1
    alone = Trainer(editor, records, TrainConfig(batch_size=2, loc_partners=0, influence_draws=1))
    assert alone.partner_indices(1, alone.batch_indices(1)) == []
    losses = trainer.step(1)  # partner rows join the locality KL; the step runs and gives finite losses
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_scene_gate_term_trains_the_scene_gate(tiny_backbone, records, make_editor):
    """With a scene gate, each step adds its logistic term (re-rendered image open, unrelated shut) and
    the gate's two parameters get gradients from it."""
    config = VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2, scene_gate=True)
    editor = make_editor(tiny_backbone, EditPlacement(-1, (0,), 0), config)
    before = editor.adapter.scene.threshold.item()
    result = train(editor, records, TrainConfig(steps=3, batch_size=2, lr=1e-2, influence_draws=1,
                                                scene_reference=3), progress=False)
    assert all("scene" in h and h["scene"] > 0 for h in result.history)
    assert editor.adapter.scene.threshold.item() != before
    # The salient gate's reference is the mean LM-input state per visual token over the first 3 records'
    # images, each run alone (the batched mean must equal it).
    split = SplitForward(tiny_backbone, -1)
    alone = [visual_states(split, record.load_image("image"))[0] for record in records[:3]]
    torch.testing.assert_close(editor.adapter.scene.reference, torch.stack(alone).mean(0), atol=1e-5, rtol=1e-5)


def test_target_role_is_drawn_from_the_seed_and_trained(tiny_backbone, records, make_editor):
    """The target-role vector is re-drawn from the seed like the other weights, reaches the batched
    training signals (right-padded per record) and gets gradients."""
    config = VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2, target_role=True)
    drawn = []
    for seed in (0, 0, 1):
        editor = make_editor(tiny_backbone, EditPlacement(-1, (0,), 0), config)
        reset_adapter(editor, seed)
        drawn.append(editor.adapter.vead.target_role.detach().clone())
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
    trainer = Trainer(editor, records, TrainConfig(batch_size=2, lr=1e-2, influence_draws=1))
    signal = trainer.store.signal(0)
    target = signal.target_mask()
    image, prompt, alt = example_rows(records[0], "vqa", trainer.formats)["rel"]
    n_target = target_lengths(tiny_backbone, [prompt], [alt], with_image=True)[0]
    assert target.sum() == n_target and target[0, -n_target:].all()  # the last real tokens, right after the prompt
    before = editor.adapter.vead.target_role.detach().clone()
    trainer.step(1)
    assert not torch.equal(editor.adapter.vead.target_role, before)


@pytest.mark.parametrize(("name", "same_image"), [("llava", 0.0), ("blip2", 0.0), ("blip2", 0.5)])
def test_a_step_in_parts_gives_the_one_pass_gradient(name, same_image, tiny_dirs, records, make_editor):
    """rows_per_backward runs the top layers a few rows at a time: the same losses and gradients as the
    step that runs every row at once (scene gate and target role on, so every term is in the sum; with
    the same-image term too)."""
    from dataclasses import replace

    backbone = load_backbone(name, tiny_dirs[name])
    gated = VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2, scene_gate=True, target_role=True)
    config = TrainConfig(steps=1, batch_size=2, lr=1e-2, influence_draws=1, loc_partners=1,
                         same_image_weight=same_image)
    results = {}
    for rows in (0, 3, 1):
        editor = make_editor(backbone, EditPlacement(0, (1,), 1), gated)
        trainer = Trainer(editor, records, replace(config, rows_per_backward=rows))
        reset_adapter(editor, config.seed)
        width = backbone.config.text_config.hidden_size
        editor.adapter.scene.set_reference(torch.zeros(backbone.n_visual_tokens, width))
        trainer.optimizer.step = lambda: None  # keep the gradients, leave the weights
        losses = trainer.step(1)
        grads = {k: p.grad.clone() for k, p in editor.adapter.named_parameters() if p.grad is not None}
        results[rows] = losses, grads
    whole_losses, whole = results[0]
    assert ("same_image" in whole_losses) == (same_image > 0)
    for rows in (3, 1):
        losses, grads = results[rows]
        assert losses.keys() == whole_losses.keys()
        assert all(losses[k] == pytest.approx(whole_losses[k], rel=1e-4, abs=1e-6) for k in losses), rows
        assert grads.keys() == whole.keys()
        for key in whole:
            torch.testing.assert_close(grads[key], whole[key], rtol=1e-3, atol=1e-6, msg=f"{rows} rows: {key}")


@pytest.mark.parametrize(("rows_per_backward", "poisoned", "term"), [(0, "target_nll", "rel"),
                                                                     (3, "im_alignment", "align")])
def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(rows_per_backward, poisoned, term, llava,
                                                                     records, make_editor, tmp_path, monkeypatch):
    """A NaN loss term at step 3 (a poisoned loss function; the step in one pass or in parts) stops the run
    before the optimizer step, naming step, batch and term; the step-2 checkpoint stays, with finite weights."""
    editor = make_editor(llava, EditPlacement(0, (1,), 1))
    config = TrainConfig(steps=5, batch_size=2, lr=1e-2, influence_draws=1, checkpoint_every=1,
                         rows_per_backward=rows_per_backward)
    real, at = getattr(losses, poisoned), {"step": 0}
    monkeypatch.setattr(losses, poisoned, lambda *a: real(*a) * (float("nan") if at["step"] == 3 else 1.0))
    before = {}

    def count(step, _):
        at["step"] = step + 1
        if step == 2:
            before.update(_weights(editor))

    with pytest.raises(TrainingDiverged) as stopped:
        train(editor, records, config, tmp_path, progress=False, on_step=count)
    message = str(stopped.value)
    assert re.fullmatch(rf"step 3, batch of records \[\d+, \d+\]: loss term '{term}' is nan; stopped before the "
                        rf"optimizer step; the last good checkpoint \(step 2\) is kept in {re.escape(str(tmp_path))}",
                        message), message
    assert all(torch.equal(v, before[k]) for k, v in _weights(editor).items())  # the NaN never reached the weights
    assert json.loads((tmp_path / STATE_FILE).read_text())["step"] == 2
    kept = load_file(tmp_path / "adapter-step0000002.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter-step0000002.safetensors", "optimizer-step0000002.safetensors", STATE_FILE]


def test_a_learning_rate_that_blows_up_stops_training_before_a_bad_checkpoint(llava, records, make_editor, tmp_path):
    editor = make_editor(llava, EditPlacement(0, (1,), 1))
    config = TrainConfig(steps=6, batch_size=2, lr=1e36, influence_draws=1, checkpoint_every=1)
    diverged = (r"^step \d, batch of records \[\d+, \d+\]: (loss term '\w+' is (-?inf|nan)|the gradient of"
                r"|the optimizer step made adapter weight)")
    with pytest.raises(TrainingDiverged, match=diverged) as stopped:
        train(editor, records, config, tmp_path, progress=False)
    print(stopped.value)
    state = json.loads((tmp_path / STATE_FILE).read_text()) if (tmp_path / STATE_FILE).is_file() else None
    if state is not None:  # whatever was kept is finite
        assert all(torch.isfinite(t).all() for t in load_file(tmp_path / state["weights"]).values())
