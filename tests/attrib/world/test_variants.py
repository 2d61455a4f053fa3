"""image_rephrase variants keep the answer (or the caption) while changing the picture."""
import numpy as np
import pytest

from attrib.world.questions import VQA_FAMILIES, InfeasibleQuestion, caption, evaluate, sample_question
from attrib.world.scene import WorldConfig, generate_scene, layout_ok
from attrib.world.variants import caption_variant, question_variant

CONFIG = WorldConfig()


@pytest.mark.parametrize("family", VQA_FAMILIES)
def test_question_variant_keeps_answer_and_object(family):
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(60):
        scene = generate_scene(rng, CONFIG)
        try:
            q = sample_question(scene, rng, family)
        except InfeasibleQuestion:
            continue
        v = question_variant(scene, q, rng, CONFIG)
        assert evaluate(v, family, q.slots) == (q.answer, q.target)
        assert layout_ok([o.box for o in v.objects], CONFIG)
        assert v.background_seed != scene.background_seed
        assert [(o.shape, o.color) for o in v.objects] == [(o.shape, o.color) for o in scene.objects]
        moved += [o.box for o in v.objects] != [o.box for o in scene.objects]
        if family == "position":  # relative positions kept: no pair swaps sides
            for i, a in enumerate(scene.objects):
                for j in range(i):
                    for axis in (0, 1):
                        old = a.center[axis] - scene.objects[j].center[axis]
                        new = v.objects[i].center[axis] - v.objects[j].center[axis]
                        assert old * new >= 0
    assert moved > 40  # objects really move (the restyle-only fallback is rare)


def test_caption_variant_keeps_caption_and_sizes():
    rng = np.random.default_rng(1)
    for _ in range(60):
        scene = generate_scene(rng, CONFIG)
        v = caption_variant(scene, rng, CONFIG)
        assert caption(v) == caption(scene)
        assert [o.size for o in v.objects] == [o.size for o in scene.objects]
        assert v.background_seed != scene.background_seed
