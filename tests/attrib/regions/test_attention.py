"""LastQueryAttention against the real attention modules (the shortcut vs the straightforward run)."""
from __future__ import annotations

import torch

from attrib.regions.capture import capture_layers, last_query_attention
from attrib.regions.naive import naive_attention_outputs


def test_clean_output_matches_module(tiny_backbone, tiny_images):
    inputs = tiny_backbone.encode(tiny_images, ["what color is the circle?", "red"])
    layers = list(range(tiny_backbone.n_layers))
    captures = capture_layers(tiny_backbone, inputs, layers)
    for layer in layers:
        for row in range(2):
            attn = last_query_attention(tiny_backbone, layer, captures[layer], row)
            assert torch.allclose(attn.output, captures[layer].output[row], atol=1e-5)


def test_perturbed_and_knockout_match_module(tiny_backbone, tiny_images):
    inputs = tiny_backbone.encode(tiny_images, ["what color is the circle?", "red"])
    captures = capture_layers(tiny_backbone, inputs, [1])
    positions = tiny_backbone.visual_positions(inputs["input_ids"])
    row = 1
    attn = last_query_attention(tiny_backbone, 1, captures[1], row)
    index = positions[row][torch.tensor([[0, 1, -1], [2, 3, 0]])]  # two windows, the first padded
    valid = torch.tensor([[True, True, False], [True, True, True]])
    index = torch.where(valid, index, torch.full_like(index, -1))
    noise = torch.randn(2, 3, 3, captures[1].hidden.shape[-1], generator=torch.Generator().manual_seed(0))
    fast = attn.perturbed(index, valid, noise)
    reference = naive_attention_outputs(tiny_backbone, 1, inputs, row, index, valid, noise)
    assert torch.allclose(fast, reference, atol=1e-5)
    knocked = attn.knocked_out(index, valid)
    reference = naive_attention_outputs(tiny_backbone, 1, inputs, row, index, valid, None)
    assert torch.allclose(knocked, reference[:, 0], atol=1e-5)
