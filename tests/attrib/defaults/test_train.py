"""The default-model trainer: a run killed mid-stage and resumed ends with the weights of an unbroken run."""
from __future__ import annotations

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


def test_a_default_can_start_from_another_runs_stage_snapshot(tmp_path, monkeypatch):
    monkeypatch.setitem(RECIPES, "llava", RECIPE)
    out = train.train_default("llava", tmp_path / "out", tmp_path / "work", save_every=10)
    snapshots = sorted(p.name for p in (tmp_path / "work" / "llava").glob("stage-*.safetensors"))
    assert snapshots == ["stage-attend.safetensors", "stage-language.safetensors", "stage-vision.safetensors"]
    shipped = train.load_backbone("llava", out).model.state_dict()
    last = load_file(train.stage_snapshot(tmp_path / "work", "llava", "attend"))
    assert all(torch.equal(last[k].float(), shipped[k].float()) for k in shipped)  # fp16, as shipped

    recipe = replace(RECIPES["minigpt4"], sizes=SMALL, init_stage="language")
    tokenizer = train.AutoTokenizer.from_pretrained(out, local_files_only=True)
    model, _ = train.build_backbone("minigpt4", SMALL, tokenizer, seed=0)
    train._init_from(model, recipe, tmp_path / "out", tmp_path / "work")
    language = load_file(train.stage_snapshot(tmp_path / "work", "llava", "language"))
    weight = "model.language_model.layers.0.self_attn.q_proj.weight"
    copied = model.state_dict()["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(copied, language[weight].float())
    assert not torch.equal(copied, shipped[weight])  # the snapshot, not the finished model
    with pytest.raises(FileNotFoundError, match="train llava first"):
        train._init_from(model, replace(recipe, init_stage="joint"), tmp_path / "out", tmp_path / "work")
