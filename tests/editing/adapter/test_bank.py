"""The edit bank: batched routing scores equal the per-edit ones, inputs go to their own edit, inputs that
concern no edit stay bit-identical, the latest edit wins a shared image, restore empties the bank."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from editing.adapter.vead import VeadConfig
from editing.editor import EditRequest
from tests.editing.conftest import SMALL

PROMPT = "what color is the circle?"
TARGETS = ["blue", "red", "yes", "blue square"]
GATED = VeadConfig(**{**SMALL.to_json(), "scene_gate": True, "scene_similarity": "chamfer"})


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]


def _logits(backbone, images, prompts=None):
    prompts = prompts or [PROMPT] * len(images)
    with torch.no_grad():
        return backbone.forward(backbone.encode(images, prompts), use_cache=False).logits


def _each_alone(editor, backbone, images, n=3):
    """The logits of images[i] with edit i (TARGETS[i]) alone in the editor, for i < n."""
    alone = []
    for i in range(n):
        editor.edit(EditRequest(images[i], PROMPT, TARGETS[i]))
        alone.append(_logits(backbone, images[i:i + 1]))
        editor.restore()
    return alone


def _sharp_gate(editor):
    """Scene gate that opens for the edit's own image only: α = 1000, β = 0.999 (chamfer of distinct
    noise images is far lower)."""
    with torch.no_grad():
        editor.adapter.scene.log_scale.fill_(math.log(1000.0))
        editor.adapter.scene.threshold.fill_(0.999)


def test_each_input_goes_to_its_own_edit_and_others_stay_unedited(tiny_backbone, images, make_editor):
    editor = make_editor(tiny_backbone, -1, GATED)
    _sharp_gate(editor)
    plain = _logits(tiny_backbone, images)
    alone = _each_alone(editor, tiny_backbone, images)
    for i in range(3):
        editor.edit(EditRequest(images[i], PROMPT, TARGETS[i]))
    assert len(editor.hook.bank) == 3
    together = _logits(tiny_backbone, images)  # images 0..2 edited, image 3 in none of the edits
    for i in range(3):
        assert not torch.equal(alone[i][0], plain[i])
        torch.testing.assert_close(together[i], alone[i][0], rtol=0, atol=1e-5)
    assert torch.equal(together[3], plain[3])
    best, weight, keep = editor.hook.bank.route(editor.edit_signal(EditRequest(images[1], PROMPT, "x")).visual_states())
    assert best.tolist() == [1] and keep.tolist() == [True] and weight.item() > 0.5
    editor.restore()
    assert torch.equal(_logits(tiny_backbone, images), plain)


def test_latest_edit_wins_a_shared_image(tiny_backbone, images, make_editor):
    editor = make_editor(tiny_backbone, -1, GATED)
    _sharp_gate(editor)
    editor.edit(EditRequest(images[0], PROMPT, TARGETS[1]))
    latest = _logits(tiny_backbone, images[:1])
    editor.restore()
    editor.edit(EditRequest(images[0], PROMPT, TARGETS[0]))
    editor.edit(EditRequest(images[1], PROMPT, TARGETS[2]))
    editor.edit(EditRequest(images[0], PROMPT, TARGETS[1]))
    torch.testing.assert_close(_logits(tiny_backbone, images[:1]), latest, rtol=0, atol=1e-5)


@pytest.mark.parametrize("similarity", ["salient", "chamfer"])
def test_scene_logits_over_the_bank_equal_the_gate_per_edit(tiny_backbone, images, make_editor, similarity):
    config = VeadConfig(**{**GATED.to_json(), "scene_similarity": similarity})
    editor = make_editor(tiny_backbone, -1, config)
    signals = [editor.edit(EditRequest(image, PROMPT, target)) for image, target in zip(images, TARGETS)]
    if similarity == "salient":
        editor.adapter.scene.set_reference(torch.stack([s.visual_states()[0] for s in signals]).mean(0))
    torch.manual_seed(0)
    visual = signals[0].visual_states().repeat(5, 1, 1) + 0.3 * torch.randn(5, *signals[0].visual_states().shape[1:])
    visual[0] = signals[2].visual_states()[0]
    batched = editor.hook.bank.scene_logits(visual)
    each = torch.stack([editor.adapter.scene_logits(visual, s) for s in signals], 1)
    torch.testing.assert_close(batched, each, rtol=1e-5, atol=1e-4)
    assert editor.hook.bank.route(visual)[0][0].item() == 2


def test_im_scores_over_the_bank_equal_the_im_per_edit(tiny_backbone, images, make_editor):
    editor = make_editor(tiny_backbone, -1)
    signals = [editor.edit(EditRequest(image, PROMPT, target)) for image, target in zip(images, TARGETS)]
    torch.manual_seed(1)
    visual = torch.randn(3, *signals[0].visual_states().shape[1:])
    each = torch.stack([torch.sigmoid(editor.adapter.im(visual, s.query.expand(3, -1))).mean(1) for s in signals], 1)
    torch.testing.assert_close(editor.hook.bank.im_scores(visual), each, rtol=1e-5, atol=1e-6)


def test_a_bank_of_one_is_the_single_edit_adapter(tiny_backbone, images, make_editor):
    editor = make_editor(tiny_backbone, 0)
    request = EditRequest(images[0], PROMPT, TARGETS[0])
    signal = editor.edit(request)
    banked = _logits(tiny_backbone, images)
    editor.restore()
    editor.hook.signal = signal  # the one-edit broadcast path the trainer uses
    broadcast = _logits(tiny_backbone, images)
    editor.restore()
    torch.testing.assert_close(banked, broadcast, rtol=0, atol=1e-5)


def test_restore_after_many_edits_is_bit_exact_and_refits_after_weight_changes(tiny_backbone, images, make_editor):
    editor = make_editor(tiny_backbone, -1, GATED)
    plain = _logits(tiny_backbone, images)
    for k in range(12):
        editor.edit(EditRequest(images[k % 4], PROMPT, TARGETS[k % 4]))
    before = _logits(tiny_backbone, images)
    with torch.no_grad():  # new adapter weights: the bank's cached projections must be recomputed
        editor.adapter.vead.end.weight.mul_(2)
    assert not torch.equal(_logits(tiny_backbone, images), before)
    editor.restore()
    assert not editor.is_edited and len(editor.hook.bank) == 0
    assert torch.equal(_logits(tiny_backbone, images), plain)
