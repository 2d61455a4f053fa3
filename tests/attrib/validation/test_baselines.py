"""The captum and attention baselines on the tiny backbones (`attrib.validation.baselines`)."""
from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients

from attrib.validation.baselines import (
    inputs_and_keys,
    integrated_gradients_maps,
    key_logit_forward,
    layer_integrated_gradients_maps,
    qformer_cross_attention,
    raw_attention_maps,
    through_cross_attention,
)


def test_baseline_maps_have_the_grid_shape_and_see_the_image(tiny_backbone, samples):
    records, images, prompts = samples
    rows, cols = tiny_backbone.spec.grid_shape(tiny_backbone.config)
    for result in (integrated_gradients_maps(tiny_backbone, images, prompts, steps=4),
                   layer_integrated_gradients_maps(tiny_backbone, images, prompts, steps=4)):
        assert result.maps.shape == (2, 1, rows * cols) and result.regions.shape == (rows, cols)
        assert torch.isfinite(result.maps).all() and result.maps.abs().sum() > 0
    attention = raw_attention_maps(tiny_backbone, images, prompts)
    assert attention.maps.shape == (2, tiny_backbone.n_layers, rows * cols)
    assert (attention.maps >= 0).all() and (attention.maps.sum(-1) <= 1 + 1e-5).all()


@pytest.mark.parametrize("name", ["blip2", "minigpt4"])
def test_cross_attention_is_the_qformers_own(tiny_dirs, samples, name):
    """The hook-captured cross-attention equals what the Q-Former returns with output_attentions, run by hand."""
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone(name, tiny_dirs[name])
    _, images, prompts = samples
    inputs, _ = inputs_and_keys(backbone, images, prompts)
    model = backbone.model.model if hasattr(backbone.model, "model") else backbone.model
    qformer = model.qformer
    previous = qformer.config._attn_implementation
    qformer.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            patches = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
            out = qformer(query_embeds=model.query_tokens.expand(len(images), -1, -1), encoder_hidden_states=patches,
                          encoder_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long),
                          output_attentions=True)
    finally:
        qformer.set_attn_implementation(previous)
    expected = torch.stack([a.mean(1) for a in out.cross_attentions]).mean(0)  # heads, then layers
    assert torch.allclose(qformer_cross_attention(backbone, inputs), expected, atol=1e-6)


def test_per_query_maps_are_spread_by_the_cross_attention(tiny_dirs, samples):
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("minigpt4", tiny_dirs["minigpt4"])
    _, images, prompts = samples
    rows, cols = backbone.spec.grid_shape(backbone.config)
    cross = qformer_cross_attention(backbone, inputs_and_keys(backbone, images, prompts)[0])[..., -rows * cols:]
    n_query = backbone.n_visual_tokens
    one_hot = torch.eye(n_query).expand(len(images), -1, -1)  # "layer" i: all weight on query i
    spread = through_cross_attention(backbone, one_hot, images, prompts, batch_size=1)
    assert torch.allclose(spread, cross, atol=1e-6)  # query i's map is its own cross-attention row
    weights = torch.rand(len(images), 3, n_query, generator=torch.Generator().manual_seed(0))
    spread = through_cross_attention(backbone, weights, images, prompts)
    for n in range(len(images)):  # straightforward: a weighted sum of the rows
        for layer in range(3):
            expected = sum(weights[n, layer, q] * cross[n, q] for q in range(n_query))
            assert torch.allclose(spread[n, layer], expected, atol=1e-5)


def test_integrated_gradients_completeness(tiny_dirs, samples):
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("llava", tiny_dirs["llava"])
    _, images, prompts = samples
    inputs, keys = inputs_and_keys(backbone, images, prompts)
    forward = key_logit_forward(backbone.model)
    pixels, text = inputs["pixel_values"], (inputs["input_ids"], inputs["attention_mask"])
    attr, delta = IntegratedGradients(forward).attribute(pixels, baselines=torch.zeros_like(pixels), target=keys,
                                                         additional_forward_args=text, n_steps=64,
                                                         return_convergence_delta=True)
    with torch.no_grad():
        rows = torch.arange(len(keys))
        gap = forward(pixels, *text)[rows, keys] - forward(torch.zeros_like(pixels), *text)[rows, keys]
    assert gap.abs().min() > 1e-4  # the wrapper really feeds the image (unbound LLM wrappers drop it)
    assert attr.flatten(1).sum(1).detach() == pytest.approx(gap.detach(), rel=0.05, abs=1e-4)
    assert delta.abs().max() <= 0.05 * gap.abs().max() + 1e-4
