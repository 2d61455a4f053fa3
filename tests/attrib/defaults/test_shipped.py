"""The shipped default backbones: plain HF folders that load through load_backbone, small, and whose
manifest accuracies are real measurements (re-measured here on a fresh held-out sample)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from attrib.backbones.loader import load_backbone
from attrib.defaults.evaluate import _family_batch, teacher_forced_hits
from attrib.defaults.recipe import DEFAULT_CHAIN, DEFAULT_MODELS, DEFAULTS_DIR, ORDER, RECIPES, default_model
from attrib.world import VQA_FAMILIES, WorldConfig, WorldSampler

SHIPPED = [name for name in ORDER if (DEFAULTS_DIR / name / "config.json").is_file()]
MAX_MB = 12
# minigpt4_routed on the position test's 80 questions (stop 21): 85.0 % (the MiniGPT-4 default 53.8 %).
FLOOR_ROUTED = 0.8


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    """(folder name, backbone): llava_base, llava, llava_bf16 and llava_one are LLaVAs, minigpt4_laid,
    minigpt4_one, minigpt4_grid and minigpt4_routed MiniGPT-4s, blip2_grid, blip2_laid and blip2_one BLIP-2s,
    each in its own folder."""
    return request.param, load_backbone(RECIPES[request.param].backbone, DEFAULTS_DIR / request.param)


def test_llava_default_is_shipped():
    assert default_model("llava").name in SHIPPED, "run make toy-models"


def test_every_backbone_has_a_shipped_default_folder():
    """What commands load with no MODEL: LLaVA's one-folder bf16 model, MiniGPT-4's and BLIP-2's laid-out ones
    built on it."""
    assert default_model("llava") == DEFAULTS_DIR / "llava_one"
    assert default_model("minigpt4") == DEFAULTS_DIR / "minigpt4_one"
    assert default_model("blip2") == DEFAULTS_DIR / "blip2_one"
    for backbone in ("llava", "blip2", "minigpt4"):
        folder = default_model(backbone)
        assert folder.name in SHIPPED and RECIPES[folder.name].backbone == backbone


def test_defaults_reuse_only_defaults():
    """`make toy-models` retrains the three defaults alone: each starts from scratch or from the parts of a
    default trained before it in the chain, and its manifest names that source."""
    assert sorted(DEFAULT_CHAIN) == sorted(DEFAULT_MODELS.values())
    for position, name in enumerate(DEFAULT_CHAIN):
        source = RECIPES[name].init_from
        assert source is None or source[0] in DEFAULT_CHAIN[:position], name
        manifest = json.loads((DEFAULTS_DIR / name / "manifest.json").read_text())
        assert manifest["init_from"] == (source[0] if source else None)


def test_folder_is_small_and_has_manifest(shipped):
    name, shipped = shipped
    folder = DEFAULTS_DIR / name
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    assert size_mb <= MAX_MB
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"seed", "command", "stages", "wall_s", "prompt_template", "heldout"} <= set(manifest)
    assert "{prompt}" in manifest["prompt_template"]
    # BLIP-2's processor puts the image tokens in front of the text; the others mark them in the template.
    assert ("<image>" in manifest["prompt_template"]) == ("<image>" in shipped.spec.prompt_template)
    assert shipped.prompt_template == manifest["prompt_template"]
    assert set(manifest["heldout"]["vqa"]) == set(VQA_FAMILIES)
    assert manifest["backbone"] == shipped.spec.name


def test_manifest_accuracy_is_reproduced(shipped):
    """A fresh held-out sample (another seed) gives the manifest's mean first-token accuracy ± 10 points."""
    name, shipped = shipped
    manifest = json.loads((DEFAULTS_DIR / name / "manifest.json").read_text())
    recorded = np.mean([manifest["heldout"]["vqa"][f]["first_token"] for f in VQA_FAMILIES])
    sampler = WorldSampler(WorldConfig(), seed=424_242)
    hits = []
    for family in VQA_FAMILIES:
        images, prompts, answers = _family_batch(sampler, family, 40, "train")
        hits += [row[0] for row in teacher_forced_hits(shipped, images, prompts, answers)]
    assert abs(np.mean(hits) - recorded) <= 0.10


@pytest.mark.parametrize("base, default, floor", [("llava_base", "llava", 0.9), ("llava_base", "llava_bf16", 0.9),
                                                  ("llava_base", "llava_one", 0.9),
                                                  ("minigpt4", "minigpt4_grid", 0.9),
                                                  ("minigpt4", "minigpt4_laid", 0.9),
                                                  ("minigpt4", "minigpt4_one", 0.9),
                                                  ("blip2", "blip2_grid", 0.9), ("blip2", "blip2_laid", 0.9),
                                                  ("blip2", "blip2_one", 0.9),
                                                  ("minigpt4", "minigpt4_routed", FLOOR_ROUTED)])
def test_attention_stages_make_the_default_pick_the_object_in_the_named_region(base, default, floor):
    """The llava variant (the LLaVA default until stop 31) is llava_base plus the direction and object attention
    stages; the minigpt4_grid variant (the MiniGPT-4 default until stop 30) is its minigpt4 base plus the same
    stages on laid-out queries, the blip2_grid variant likewise on its blip2 base, the minigpt4_routed variant the
    minigpt4 base plus the same stages routed through the Q-Former's cross-attention: on 3-4-object scenes (fresh
    seed) each answers position questions far better than the model it starts from, and mostly right. The llava_bf16
    variant trains from scratch (llava_base's stages under bf16, then the existence-pair stage with its answer looks
    alone) and is held to the same margin over llava_base, its stages in fp32, as is the LLaVA default (llava_one:
    llava_bf16's first two stages, then a short answer-look stage and the pair stage); blip2_laid (its OPT trained
    on minigpt4_grid's laid-out Q-Former, blip2's first stages among its own) to the same over blip2, and
    minigpt4_laid (one folder on llava_base's Llama, laid out from its bridge on, with none of minigpt4's stages)
    over minigpt4; so are the MiniGPT-4 and BLIP-2 defaults, minigpt4_one and blip2_one (the same recipes on
    llava_one's Llama and on minigpt4_one's tower and Q-Former)."""
    if not {base, default} <= set(SHIPPED):
        pytest.skip(f"needs both {base} and {default}")
    images, prompts, answers = _family_batch(WorldSampler(WorldConfig(), seed=515_151, min_objects=3),
                                             "position", 80, "train")  # the same questions for both models
    accuracy = {}
    for name in (base, default):
        backbone = load_backbone(RECIPES[name].backbone, DEFAULTS_DIR / name)
        accuracy[name] = np.mean([row[0] for row in teacher_forced_hits(backbone, images, prompts, answers)])
    assert accuracy[default] >= max(floor, accuracy[base] + 0.2), accuracy


@pytest.mark.parametrize("base, default", [("llava_base", "llava"), ("llava_base", "llava_bf16"),
                                           ("llava_base", "llava_one"),
                                           ("minigpt4", "minigpt4_grid"), ("minigpt4", "minigpt4_laid"),
                                           ("minigpt4", "minigpt4_one"),
                                           ("minigpt4", "minigpt4_routed")])
def test_existence_stage_tells_apart_the_colours_llava_base_confuses(base, default):
    """llava_base's LM (and the minigpt4 base, which starts from it) answers "is there a blue circle?"
    with "yes" when only a yellow or purple circle is there; the existence-pair stages of the llava variant, the
    laid-out MiniGPT-4s (minigpt4_grid, minigpt4_laid, minigpt4_one) and of minigpt4_routed fixed most of that
    without losing the "yes" of the same pairs (fresh seed). llava_bf16 (from scratch; its own base stages under
    bf16 answered existence 88.5 % at stop 26) is held to the same after its pair stage, and so is the LLaVA
    default, llava_one."""
    from attrib.defaults.batches import existence_pair
    from attrib.defaults.recipe import PROMPTS
    from attrib.world import render

    if not {base, default} <= set(SHIPPED):
        pytest.skip(f"needs {base} and {default}")
    sampler = WorldSampler(WorldConfig(), seed=626_262)
    images, prompts, answers = [], [], []
    while len(prompts) < 120:
        scene = sampler.scene()
        pair = existence_pair(scene, sampler.rng, ("blue", "yellow", "purple"))
        if pair:
            images += [render(scene)] * 2
            prompts += [PROMPTS["vqa"].format(src=q.text) for q in pair]
            answers += [q.answer for q in pair]
    right = {}
    for name in (base, default):
        backbone = load_backbone(RECIPES[name].backbone, DEFAULTS_DIR / name)
        hits = np.array([row[0] for row in teacher_forced_hits(backbone, images, prompts, answers)])
        right[name] = (hits[0::2].mean(), hits[1::2].mean())  # ("no", "yes")
    # minigpt4_routed at stop 21: "no" 98.3 / "yes" 100 % (the MiniGPT-4 default 1.7 / 98.3 %).
    assert right[base][0] < 0.3 and right[default][0] >= 0.85 and right[default][1] >= 0.9, right


def test_load_model_names_an_unknown_backbone_and_a_missing_default(tmp_path, monkeypatch):
    from attrib.data import DataError
    from attrib.defaults import recipe

    with pytest.raises(ValueError, match="unknown backbone 'gpt'; choose one of: blip2, llava, minigpt4"):
        recipe.load_model("gpt")
    monkeypatch.setattr(recipe, "DEFAULTS_DIR", tmp_path)
    with pytest.raises(DataError, match="the default blip2 model is not there; run `make toy-models`"):
        recipe.load_model("blip2")
    backbone = recipe.load_model("blip2", DEFAULTS_DIR / "blip2_one")  # a given folder is loaded as it is
    assert backbone.spec.name == "blip2"
