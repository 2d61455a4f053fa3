"""The default-model trainer: a run killed mid-stage and resumed ends with the weights of an unbroken run; a NaN
loss stops it with the last good checkpoint kept; a malformed checkpoint is refused before training (fuzzed)."""
from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import attrib.defaults.train as train
from attrib.defaults.recipe import RECIPES, TOY_SIZES, Recipe, Stage
from attrib.errors import ArtifactError, TrainingDiverged
from tests.mutations import damaged_bytes, json_mutations, valid_or_clean_error

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


def dies_on_call(real, n: int):
    """``real`` that raises `Killed` on its ``n``-th call instead of computing (a run killed mid-stage)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Killed
        return real(*args, **kwargs)

    return wrapped


def test_killed_and_resumed_run_reaches_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(RECIPES, "llava", RECIPE)
    whole = train.train_default("llava", tmp_path / "whole", tmp_path / "work-whole", save_every=1)

    real_loss = train.language_loss
    monkeypatch.setattr(train, "language_loss", dies_on_call(real_loss, 3))
    with pytest.raises(Killed):
        train.train_default("llava", tmp_path / "resumed", tmp_path / "work-resumed", save_every=1)
    checkpoint = json.loads((tmp_path / "work-resumed" / "llava" / train.CHECKPOINT).read_text())
    assert (checkpoint["stage"], checkpoint["step"]) == (1, 2)  # two language steps were saved
    assert [p.name for p in (tmp_path / "work-resumed" / "llava").glob("checkpoint-*")] == [checkpoint["tensors"]]
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


VISION = Recipe("llava", (RECIPE.stages[0],), sizes=SMALL)  # two vision steps: the cheapest run with a checkpoint


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(RECIPES, "llava", replace(VISION, stages=(replace(RECIPE.stages[0], steps=3),)))
    real_loss, calls = train.vision_loss, []

    def nan_on_second_call(*args, **kwargs):
        calls.append(1)
        loss, metric = real_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 2 else loss), metric

    monkeypatch.setattr(train, "vision_loss", nan_on_second_call)
    work = tmp_path / "work" / "llava"
    with pytest.raises(TrainingDiverged, match=r"stage 'vision', step 2 of 3: the vision loss is nan; .*"
                                               r"last good checkpoint stays in .*checkpoint.json"):
        train.train_default("llava", tmp_path / "out", tmp_path / "work", save_every=1)
    state = json.loads((work / train.CHECKPOINT).read_text())
    assert (state["stage"], state["step"]) == (0, 1) and (work / state["tensors"]).is_file()
    assert not (tmp_path / "out" / "llava").exists()
    monkeypatch.setattr(train, "vision_loss", real_loss)  # the good checkpoint resumes
    assert (train.train_default("llava", tmp_path / "out", tmp_path / "work", save_every=1) / "manifest.json").is_file()


@pytest.fixture(scope="module")
def halted(tmp_path_factory):
    """(work folder, its checkpoint JSON, model, heads, the vision stage): a three-step vision run killed
    in its second step, so the checkpoint is mid-stage, with Adam's tensors and both RNG states."""
    root = tmp_path_factory.mktemp("halted")
    recipe = replace(VISION, stages=(replace(RECIPE.stages[0], steps=3),))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(RECIPES, "llava", recipe)
        patch.setattr(train, "vision_loss", dies_on_call(train.vision_loss, 2))
        with pytest.raises(Killed):
            train.train_default("llava", root / "out", root / "work", save_every=1)
    work = root / "work" / "llava"
    model, _, heads = train._start("llava", recipe, root / "out", work)
    return work, json.loads((work / train.CHECKPOINT).read_text()), model, heads, recipe.stages[0]


_copies = itertools.count()


def _resume(work, model, heads, stage):
    """What `train_default` reads and restores before it trains again; the state, or None without one."""
    state = train._read_checkpoint(work, model, heads, 1)
    if state is not None and state["stage"] == 0 and state["step"] > 0:
        sampler = train.WorldSampler(train.WorldConfig(), seed=0)
        train._resume_stage(state, train._optimizer(model, heads, stage), sampler, stage.steps, work / train.CHECKPOINT)
    return state


def test_a_malformed_default_checkpoint_is_named_before_training(halted, tmp_path, monkeypatch):
    work, state, model, heads, stage = halted
    tensors = load_file(work / state["tensors"])
    cases = [
        ({**state, "format": "x/1"}, None, r"checkpoint.json: not a default-model training checkpoint"),
        ({**state, "stage": 2}, None, r"stage 2, step 1 is not a point of this recipe's 1 stages"),
        ({**state, "step": 7}, None, r"checkpoint.json: step 7 of stage 0, which has 3 steps"),
        ({**state, "tensors": "../x.safetensors"}, None, r"field 'tensors': '../x.safetensors' is not a file in"),
        ({**state, "log": {"stages": []}}, None, r"in 'log': missing field 'wall_s'"),
        ({**state, "sampler_rng": {"bit_generator": "PCG64"}}, None, r"field 'sampler_rng': not a numpy PCG64 state"),
        ({**state, "torch_rng": "AAAA"}, None, r"field 'torch_rng': not a torch RNG state"),
        ({**state, "optimizer": {"param_groups": [{}]}}, None, r"'param_groups': 1 param groups; the optimizer has 2"),
        (state, {**tensors, "model.lm_head.weight": tensors["model.lm_head.weight"][:1]},
         r"tensor 'lm_head.weight' has shape \[1, 32\], this recipe's model need"),
        (state, {k: v for k, v in tensors.items() if not k.startswith("heads.")}, r"does not hold this recipe's patch"),
        (state, {**tensors, "other": torch.zeros(1)}, r"unexpected tensor 'other'"),
        (state, {**tensors, "optimizer.0.exp_avg": torch.zeros(1)}, r"tensor '0.exp_avg' has shape \[1\]; parameter 0"),
    ]
    for data, damaged, message in cases:
        copy = shutil.copytree(work, tmp_path / f"c{next(_copies)}")
        (copy / train.CHECKPOINT).write_text(json.dumps(data))
        if damaged is not None:
            save_file({k: v.clone().contiguous() for k, v in damaged.items()}, copy / state["tensors"])
        with pytest.raises(ArtifactError, match=message) as caught:
            _resume(copy, model, heads, stage)
        assert str(copy) in str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setitem(RECIPES, "llava", VISION)  # the command refuses an old pickled checkpoint, trains nothing
    (tmp_path / "old" / "llava").mkdir(parents=True)
    (tmp_path / "old" / "llava" / "checkpoint.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ArtifactError, match=r"checkpoint.pt: a pickled checkpoint .* delete it to train llava"):
        train.train_default("llava", tmp_path / "out", tmp_path / "old")
    assert not (tmp_path / "out").exists()


@given(data=st.data())
def test_fuzz_default_checkpoint(halted, tmp_path, data):
    work, state, model, heads, stage = halted
    copy = shutil.copytree(work, tmp_path / f"f{next(_copies)}")
    kind = data.draw(st.sampled_from(["json", "remove", "bytes", "reshape"]))
    tensor_file = copy / state["tensors"]
    if kind == "json":
        (copy / train.CHECKPOINT).write_text(json.dumps(data.draw(json_mutations(state))))
    elif kind == "remove":
        tensor_file.unlink()
    elif kind == "bytes":
        tensor_file.write_bytes(data.draw(damaged_bytes(tensor_file.read_bytes())))
    else:
        tensors = load_file(tensor_file)
        key = data.draw(st.sampled_from(sorted(tensors)))
        tensors[key] = torch.zeros(tuple(data.draw(st.lists(st.integers(0, 40), max_size=2))))
        save_file(tensors, tensor_file)
    rng = torch.get_rng_state()
    valid_or_clean_error(lambda: _resume(copy, model, heads, stage), copy)
    torch.set_rng_state(rng)
    shutil.rmtree(copy)
