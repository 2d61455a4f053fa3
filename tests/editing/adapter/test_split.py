"""The prefix / top split reproduces the model's logits at every edit site and carries gradients only above it."""
from __future__ import annotations

import pytest
import torch

from editing.adapter.split import SplitForward
from editing.inputs import teacher_forced_batch


@pytest.mark.parametrize("edit_layer", [-1, 0, 1])
def test_split_equals_the_full_forward(tiny_backbone, tiny_images, edit_layer):
    batch = teacher_forced_batch(tiny_backbone, tiny_images, ["what color is the circle?", "how many?"],
                                 ["red", "two objects"])
    with torch.no_grad():
        reference = tiny_backbone.forward(batch.inputs, use_cache=False).logits
    split = SplitForward(tiny_backbone, edit_layer)
    site = split.prefix(batch.inputs)
    assert not site.hidden.requires_grad and site.positions.shape == (2, tiny_backbone.n_visual_tokens)
    assert torch.allclose(split.top(site), reference, atol=1e-5)
    select = torch.tensor([[3, 5], [0, 1]])
    picked = split.top(site, select=select)
    assert torch.allclose(picked, reference[torch.arange(2)[:, None], select], atol=1e-5)


def test_gradients_flow_from_the_rewrite_only(tiny_backbone, tiny_images):
    batch = teacher_forced_batch(tiny_backbone, tiny_images[:1], ["what color is the circle?"], ["red"])
    split = SplitForward(tiny_backbone, 0)
    site = split.prefix(batch.inputs)
    shift = torch.zeros(site.hidden.shape[-1], requires_grad=True)

    def rewrite(hidden, positions):
        out = hidden.clone()
        out[0, positions[0]] = out[0, positions[0]] + shift
        return out

    split.top(site, rewrite)[0, -1].logsumexp(-1).backward()
    assert shift.grad is not None and shift.grad.abs().sum() > 0


def test_edit_layer_is_checked(tiny_backbone):
    with pytest.raises(ValueError, match="outside -1"):
        SplitForward(tiny_backbone, tiny_backbone.n_layers)
