"""The default-model trainer: a run killed mid-stage and resumed ends with the weights of an unbroken run."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import attrib.defaults.train as train
from attrib.defaults.recipe import RECIPES, TOY_SIZES, Recipe, Stage

SMALL = replace(TOY_SIZES, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_hidden=32,
                text_layers=2, text_heads=2, text_mlp=64)
LM = {"model.multi_modal_projector": 1.0, "model.language_model": 1.0, "lm_head": 1.0}
RECIPE = Recipe("llava", (
    Stage("vision", "vision", 2, 2e-3, {"model.vision_tower": 1.0}, warmup=1, batch_images=2),
    Stage("language", "language", 4, 1e-3, LM, warmup=1, batch_images=2, questions_per_image=2, facts=2,
          max_objects=((2, 1),), family_weights={"exists": 1.0, "count": 1.0}),
    # Runs eagerly for the attention weights; the saved model is back on its own attention.
    Stage("attend", "language", 2, 1e-3, LM, warmup=1, batch_images=2, questions_per_image=2, facts=2,
          family_weights={"color_of_shape": 1.0, "count": 0.2}, attend_layers=(1,), attend_weight=0.5),
), sizes=SMALL)


class Killed(RuntimeError):
    pass


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_killed_and_resumed_run_reaches_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(RECIPES, "llava", RECIPE)
    whole = train.train_default("llava", tmp_path / "whole", tmp_path / "work-whole", save_every=1)

    real_loss, calls = train.language_loss, []

    def dies_on_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "language_loss", dies_on_third_call)
    with pytest.raises(Killed):
        train.train_default("llava", tmp_path / "resumed", tmp_path / "work-resumed", save_every=1)
    checkpoint = torch.load(tmp_path / "work-resumed" / "llava" / "checkpoint.pt", weights_only=False)
    assert (checkpoint["stage"], checkpoint["step"]) == (1, 2)  # two language steps were saved
    monkeypatch.setattr(train, "language_loss", real_loss)
    resumed = train.train_default("llava", tmp_path / "resumed", tmp_path / "work-resumed", save_every=1)

    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    manifest = (resumed / "manifest.json").read_text()
    assert '"language"' in manifest and '"vision"' in manifest and '"attend"' in manifest
    assert train.load_backbone("llava", resumed).model.config._attn_implementation == "sdpa"


def test_a_named_variant_starts_from_another_default(tmp_path, monkeypatch):
    """A recipe that starts from another default (as MiniGPT-4's starts from LLaVA's): a model in its own
    folder, every weight copied from the one it starts from."""
    monkeypatch.setitem(RECIPES, "llava", RECIPE)
    frozen = replace(RECIPE.stages[-1], lr=0.0)  # the attend stage at LR 0
    variant = Recipe("llava", (frozen,), init_from=("llava", {"": ""}), sizes=SMALL)
    monkeypatch.setitem(RECIPES, "llava_variant", variant)
    base = train.train_default("llava", tmp_path / "out", tmp_path / "work")
    variant = train.train_default("llava_variant", tmp_path / "out", tmp_path / "work")
    assert variant == tmp_path / "out" / "llava_variant"
    a, b = _weights(base), _weights(variant)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # LR 0: the copy, unchanged
    manifest = json.loads((variant / "manifest.json").read_text())
    assert (manifest["backbone"], manifest["name"], manifest["init_from"]) == ("llava", "llava_variant", "llava")


def test_a_bf16_recipe_trains_eagerly_under_autocast_and_says_so(tmp_path, monkeypatch):
    seen = []
    real_loss = train.language_loss

    def watching(model, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), model.config._attn_implementation))
        return real_loss(model, *args, **kwargs)

    monkeypatch.setattr(train, "language_loss", watching)
    monkeypatch.setitem(RECIPES, "llava", replace(RECIPE, autocast="bf16"))
    folder = train.train_default("llava", tmp_path / "out", tmp_path / "work")
    assert seen and all(state == (True, "eager") for state in seen)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["autocast"] == "bf16"
    assert train.load_backbone("llava", folder).model.config._attn_implementation == "sdpa"


def test_a_stage_marked_fp32_leaves_the_recipes_autocast(tmp_path, monkeypatch):
    seen = []
    real_loss = train.language_loss

    def watching(model, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real_loss(model, *args, **kwargs)

    monkeypatch.setattr(train, "language_loss", watching)
    vision, language, attend = RECIPE.stages
    recipe = replace(RECIPE, stages=(vision, language, replace(attend, fp32=True)), autocast="bf16")
    monkeypatch.setitem(RECIPES, "llava", recipe)
    folder = train.train_default("llava", tmp_path / "out", tmp_path / "work")
    assert seen == [True] * language.steps + [False] * attend.steps
    assert json.loads((folder / "manifest.json").read_text())["fp32_stages"] == ["attend"]


def test_an_unknown_autocast_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(RECIPES, "llava", replace(RECIPE, autocast="fp8"))
    with pytest.raises(ValueError, match="autocast must be None or 'bf16'"):
        train.train_default("llava", tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out" / "llava").exists()
