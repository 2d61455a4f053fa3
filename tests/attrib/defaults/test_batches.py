"""Training batches: the shared-prefix KV reuse gives the logits of full sequences; which questions are asked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attrib.defaults.batches import (
    IGNORE,
    Templates,
    continuation_logits,
    existence_pair,
    hard_negative,
    pick_family,
    training_question,
)
from attrib.world import VQA_FAMILIES, WorldConfig, generate_scene
from attrib.world.questions import evaluate, feasible_families, sample_question
from attrib.world.templates import TRAIN
from attrib.world.templates import templates as family_templates


def _assert_rows_match(backbone, images, pairs, logits, labels):
    row = 0
    for image, (prompt, target) in pairs:
        full = backbone.encode([image], [prompt], [target])
        full_logits = backbone.forward(full).logits[0]
        n_target = (labels[row] != IGNORE).sum().item() - 1  # labels also cover EOS
        target_at = (labels[row] != IGNORE).nonzero()[:n_target, 0]
        # Same tokens: the continuation's target ids equal the full sequence's last ids.
        assert labels[row, target_at].tolist() == full["input_ids"][0, -n_target:].tolist()
        assert torch.allclose(logits[row, target_at - 1], full_logits[-n_target - 1:-1], atol=1e-4)
        row += 1
    assert row == len(labels)


@pytest.mark.parametrize("with_lead", [False, True])
def test_prefix_reuse_equals_full_sequences(tiny_backbone, tiny_images, with_lead):
    spec = tiny_backbone.spec
    templates = Templates(tiny_backbone.prompt_template, tiny_backbone.text_template)
    pairs = [[("what color is the circle? The answer is:", "red"), ("a photo of", "a small red circle")],
             [("how many objects are there? The answer is:", "two"), ("what shape?", "blue square")]]
    lead = [("a photo of", "a small red circle and a large blue square and a small green cross"),
            ("a photo of", "a large yellow diamond")] if with_lead else None
    with torch.no_grad():
        sets = continuation_logits(tiny_backbone.model, tiny_backbone.processor, spec, templates,
                                   tiny_images, pairs, lead=lead).sets
        assert len(sets) == (2 if with_lead else 1)
        flat = [(image, pair) for image, image_pairs in zip(tiny_images, pairs) for pair in image_pairs]
        _assert_rows_match(tiny_backbone, tiny_images, flat, *sets[0])
        if with_lead:
            _assert_rows_match(tiny_backbone, tiny_images, list(zip(tiny_images, lead)), *sets[1])


def test_family_weights_skew_the_draw_among_feasible_families():
    rng = np.random.default_rng(0)
    scenes = [generate_scene(rng, WorldConfig()) for _ in range(200)]
    assert all(pick_family(s, rng, None) is None for s in scenes[:3])  # uniform: sample_question decides
    weights = {f: 0.0 for f in VQA_FAMILIES} | {"exists": 3.0, "count": 1.0}
    picks = [pick_family(s, rng, weights) for s in scenes]
    assert set(picks) == {"exists", "count"}  # count and exists can always be asked
    assert 0.65 < picks.count("exists") / len(picks) < 0.85
    only_position = {"position": 1.0}
    lone = next(s for s in scenes if "position" not in feasible_families(s))
    with pytest.raises(ValueError, match="leave none"):
        pick_family(lone, rng, only_position)


def test_hard_negatives_bind_colour_to_a_present_shape_and_keep_yes_no_balanced():
    rng = np.random.default_rng(0)
    scenes = [generate_scene(rng, WorldConfig()) for _ in range(300)]
    for scene in scenes[:50]:
        question = hard_negative(scene, rng)
        color, shape = question.slots["color"], question.slots["shape"]
        assert question.answer == "no" and evaluate(scene, "exists", question.slots) == ("no", None)
        assert any(o.shape == shape for o in scene.objects) and (color, shape) not in {
            (o.color, o.shape) for o in scene.objects}
        assert question.template in {t.key for t in family_templates("exists", TRAIN)}
    exists = {f: 0.0 for f in VQA_FAMILIES} | {"exists": 1.0}
    draws = [training_question(s, rng, exists, hard_negatives=1.0) for s in scenes]
    noes = [(s, q) for s, q in zip(scenes, draws) if q.answer == "no"]
    assert 0.4 < len(noes) / len(draws) < 0.6  # only "no" questions are re-asked
    assert all(any(o.shape == q.slots["shape"] for o in s.objects) for s, q in noes)
    # At 0 the draw is sample_question's own, with no extra random number: older recipes keep their data.
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for scene in scenes[:20]:
        assert training_question(scene, a, exists) == sample_question(scene, b, pick_family(scene, b, exists))


def test_existence_pairs_differ_in_the_colour_word_only():
    rng = np.random.default_rng(1)
    triple = ("blue", "yellow", "purple")
    found = 0
    for _ in range(300):
        scene = generate_scene(rng, WorldConfig())
        pair = existence_pair(scene, rng, triple)
        present = [(o.color, o.shape) for o in scene.objects]
        if pair is None:  # no object of those colours whose shape is missing in another of them
            assert not any(c in triple and present.count((c, s)) == 1 and any((a, s) not in present for a in triple)
                           for c, s in present)
            continue
        found += 1
        no, yes = pair
        assert (no.answer, yes.answer) == ("no", "yes") and no.template == yes.template
        assert no.slots["shape"] == yes.slots["shape"] and no.slots["color"] != yes.slots["color"]
        assert {no.slots["color"], yes.slots["color"]} <= set(triple)
        assert evaluate(scene, "exists", no.slots) == ("no", None)
        assert scene.objects[yes.target].color == yes.slots["color"]
        assert no.template in {t.key for t in family_templates("exists", TRAIN)}
    assert found > 50


