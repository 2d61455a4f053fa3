"""Visual patching ceiling: shape, the LM-input patch that equals the counterfactual run, world
counterfactuals, the placement rule on both curves, and the artifact / figure."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import attrib.ceiling as ceiling_module
from attrib.attribution import ARTIFACT_JSON, AttributionConfig, run_attribution
from attrib.ceiling import CeilingCase, counterfactual_scene, visual_patching_ceiling, world_ceiling_cases
from attrib.data import load_records
from attrib.placement import ceiling_reach, place_edit
from attrib.world import evaluate, write_world

PROMPT = "what color is the circle? The answer is:"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("ceil") / "world", seed=2, n_train=2, n_eval=10, n_caption_train=1,
                       n_caption_eval=1)


def _last_argmax(backbone, image, prompt) -> int:
    with torch.no_grad():
        return int(backbone.forward(backbone.encode([image], [prompt])).logits[0, -1].argmax())


def _differing_pair(backbone):
    """A prompt and two images whose answers (argmax at the last prompt token) differ. Random tiny
    models lean on the text; a short prompt leaves the image more say (the tiny BLIP-2 needs it)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    images += [Image.new("RGB", (32, 32), color) for color in ((0, 0, 0), (255, 255, 255), (255, 0, 0))]
    for prompt in (PROMPT, "red", "blue", "yes"):
        answers = [_last_argmax(backbone, image, prompt) for image in images]
        for j in range(1, len(images)):
            if answers[j] != answers[0]:
                return prompt, images[0], images[j], answers[0], answers[j]
    pytest.skip("no two images with different answers on this tiny model")


def test_lm_input_patch_flips_a_constructed_answer(tiny_backbone, monkeypatch):
    prompt, image, other, answer_id, alt_id = _differing_pair(tiny_backbone)
    # The "answers" are the model's own key tokens on the two images (constructed, not words).
    monkeypatch.setattr(ceiling_module, "answer_key", lambda *args: ("", answer_id, alt_id))
    result = visual_patching_ceiling(tiny_backbone, [CeilingCase(7, image, other, prompt, "a", "b")], max_rows=2)
    assert result.flips.shape == (1, tiny_backbone.n_layers + 1) and result.indices == [7]
    # At the LM input the patched run IS the counterfactual run; after the last layer the visual states
    # can no longer reach the last position, so the answer stays the original one.
    assert result.flips[0, 0] and not result.flips[0, -1]
    assert result.clean.all() and result.counterfactual.all()
    assert len(result.curve()) == tiny_backbone.n_layers + 1


def test_world_counterfactuals_answer_alt(world):
    from attrib.world.rebuild import WorldRebuild

    records = load_records(world / "vqa_eval.json")
    rebuild = WorldRebuild()
    made = 0
    for record in records:
        scene_record = rebuild.world_record(record)
        scene = counterfactual_scene(scene_record)
        family = scene_record.question.family
        if family == "count":
            assert scene is None
        if scene is not None:
            made += 1
            assert evaluate(scene, family, scene_record.question.slots)[0] == record.alt
            changed = [(a, b) for a, b in zip(scene.objects, scene_record.scenes["image"].objects) if a != b]
            assert len(changed) == 1  # one object, one attribute
    cases = world_ceiling_cases(records, limit=3)
    assert made >= 5 and len(cases) == 3 and cases[0].prompt.endswith("The answer is:")
    assert cases[0].image.size == cases[0].counterfactual.size


def test_placement_uses_both_curves():
    attn, mlp = [0.0, 0.0, 0.1, 0.1, 0.9, 1.0], [0.0] * 6  # contribution edit layer: 3
    assert place_edit(attn, mlp).edit_layer == 3 and place_edit(attn, mlp).im_read_layer == 3
    falls = [1.0, 1.0, 0.95, 0.4, 0.1, 0.0, 0.0]  # high at the input and after L0-L1, falls after L2
    assert ceiling_reach(falls) == 1
    placed = place_edit(attn, mlp, ceiling=falls)
    # the IM reads where the ceiling has fallen to a quarter of c[0]: after layer 3 (0.1), not layer 2 (0.4)
    assert (placed.edit_layer, placed.im_read_layer, placed.contribution_edit_layer) == (1, 3, 3)
    assert place_edit(attn, mlp, ceiling=falls, read_threshold=0.5).im_read_layer == 2
    assert place_edit(attn, mlp, ceiling=[1.0, 1.0, 0.95, 0.95, 0.9, 0.9, 0.9]).im_read_layer == 5  # never falls
    assert placed.it_layers == [4, 5] and placed.to_json()["ceiling"] == falls
    assert place_edit(attn, mlp, ceiling=[0.9] * 7).edit_layer == 3  # never deeper than the contribution layer
    early = place_edit(attn, mlp, ceiling=[1.0, 0.2, 0.9, 0.9, 0.0, 0.0, 0.0])  # a noisy bump does not count
    assert (early.edit_layer, early.im_read_layer) == (-1, 0)
    relative = place_edit(attn, mlp, ceiling=[0.8, 0.75, 0.2, 0, 0, 0, 0])  # κ · c[0] = 0.72
    assert relative.edit_layer == 0
    weak = place_edit(attn, mlp, ceiling=[0.1] + [0.0] * 6)
    assert weak.edit_layer == 3 and "contribution rule kept" in weak.note
    with pytest.raises(ValueError, match="expected 7"):
        place_edit(attn, mlp, ceiling=[1.0] * 6)


def test_artifact_stores_and_draws_the_ceiling(tiny_dirs, world, tmp_path):
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("llava", tiny_dirs["llava"])
    records = load_records(world / "vqa_eval.json", n=6)
    config = AttributionConfig(draws=1, causal_samples=1, causal_draws=1, window=1, ceiling_samples=2)
    attribution = run_attribution(backbone, records[:2], config, dataset="world", ceiling_records=records)
    attribution.save(tmp_path)
    figures = attribution.plot_all(tmp_path, n_overlays=0)
    data = json.loads((tmp_path / ARTIFACT_JSON).read_text())
    assert len(data["placement"]["ceiling"]) == backbone.n_layers + 1
    assert data["details"]["ceiling"]["n"] == 2 and "im_read_layer" in data["placement"]
    assert (tmp_path / "placement.png") in figures
