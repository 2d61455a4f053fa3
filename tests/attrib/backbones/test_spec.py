"""Contract tests: every spec path resolves, on the tiny models and on the full-size architectures."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from attrib.backbones.reference import build_on_meta
from attrib.backbones.spec import SPECS, get_spec

FULL_SIZE = {"llava": (32, 576, (24, 24)), "blip2": (32, 32, (16, 16)), "minigpt4": (32, 32, (16, 16))}


def assert_spec_resolves(model: torch.nn.Module, spec) -> None:
    """Each role path names a module of the kind the engine expects."""
    config = model.config
    layers = model.get_submodule(spec.layers)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == config.text_config.num_hidden_layers
    width = config.text_config.hidden_size
    for index in (0, len(layers) - 1):
        attn = model.get_submodule(spec.layer_path(index, "attn"))
        assert "Attention" in type(attn).__name__
        norm = model.get_submodule(spec.layer_path(index, "attn_norm"))
        assert norm.weight.shape == (width,)
        mlp = model.get_submodule(spec.layer_path(index, "mlp"))
        out_features = mlp.out_features if isinstance(mlp, torch.nn.Linear) else mlp.down_proj.out_features
        assert out_features == width
    assert model.get_submodule(spec.final_norm).weight.shape == (width,)
    head = model.get_submodule(spec.lm_head)
    assert isinstance(head, torch.nn.Linear) and head.out_features == config.text_config.vocab_size
    assert model.get_submodule(spec.embed_tokens).weight.shape[1] == width
    vision = model.get_submodule(spec.vision_tower)
    assert vision.config.image_size == config.vision_config.image_size
    for path in spec.bridge:
        model.get_submodule(path)
    last_linear = [m for m in model.get_submodule(spec.bridge[-1]).modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last_linear.out_features == width  # the bridge ends in the LM's width


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_resolves_on_full_size_architecture(name):
    model = build_on_meta(name)
    spec = get_spec(name)
    assert_spec_resolves(model, spec)
    layers, visual, grid = FULL_SIZE[name]
    assert len(model.get_submodule(spec.layers)) == layers
    assert spec.n_visual_tokens(model.config) == visual
    assert spec.grid_shape(model.config) == grid


def test_spec_resolves_on_tiny_model(tiny_backbone):
    assert_spec_resolves(tiny_backbone.model, tiny_backbone.spec)


@pytest.mark.parametrize("field", ["layers", "final_norm", "lm_head", "attn", "mlp", "attn_norm"])
def test_broken_path_is_caught(field):
    broken = dataclasses.replace(get_spec("blip2"), **{field: "no_such_module"})
    with pytest.raises(AttributeError):
        assert_spec_resolves(build_on_meta("blip2"), broken)


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="blip2, llava, minigpt4"):
        get_spec("llava2")


def test_layer_path_and_template():
    spec = get_spec("minigpt4")
    assert spec.layer_path(3, "mlp") == "language_model.model.layers.3.mlp"
    assert spec.format_prompt("What?") == "###Human: <Img><image></Img> What? ###Assistant:"
