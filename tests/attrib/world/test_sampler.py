"""The online training sampler."""
import time

import numpy as np
import pytest

from attrib.world.facts import FACTS
from attrib.world.questions import CAPTION_PROMPT, COUNT_WORDS, VQA_FAMILIES, answer_pool
from attrib.world.sampler import WorldSampler
from attrib.world.scene import WorldConfig
from attrib.world.templates import TRAIN, match_template


def test_same_seed_same_stream():
    a = WorldSampler(WorldConfig(), seed=5).vqa_batch(8, questions_per_image=2, as_array=True)
    b = WorldSampler(WorldConfig(), seed=5).vqa_batch(8, questions_per_image=2, as_array=True)
    c = WorldSampler(WorldConfig(), seed=6).vqa_batch(8, questions_per_image=2, as_array=True)
    assert [x.qas for x in a] == [x.qas for x in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_vqa_batch_uses_training_templates_only():
    items = WorldSampler(WorldConfig(), seed=0).vqa_batch(200, questions_per_image=3)
    families = set()
    for image, qas in items:
        assert image.size == (64, 64) and image.mode == "RGB"
        assert 1 <= len(qas) <= 3 and len({q.question for q in qas}) == len(qas)
        for question, answer, family in qas:
            template = match_template(question, family)
            assert template is not None and template.split == TRAIN
            assert answer in answer_pool(family)
            families.add(family)
    assert families == set(VQA_FAMILIES)


def test_min_max_objects_make_a_crowded_split():
    sampler = WorldSampler(WorldConfig(), seed=1, min_objects=3, max_objects=4)
    assert {len(sampler.scene().objects) for _ in range(50)} == {3, 4}
    counts = [qa.answer for item in sampler.vqa_batch(100) for qa in item.qas if qa.family == "count"]
    assert counts and set(counts) <= {"three", "four"}
    assert set(counts) <= set(COUNT_WORDS)


def test_caption_and_fact_batches():
    sampler = WorldSampler(WorldConfig(), seed=2)
    items = sampler.caption_batch(10, as_array=True)
    assert all(i.prompt == CAPTION_PROMPT and i.image.shape == (64, 64, 3) for i in items)
    assert all(i.caption.startswith("a ") for i in items)
    known = {(f.question, f.answer) for f in FACTS}
    assert all(pair in known for pair in sampler.fact_batch(20))


def test_sampling_is_cheap():
    sampler = WorldSampler(WorldConfig(), seed=3)
    start = time.perf_counter()
    sampler.vqa_batch(64, questions_per_image=2)
    assert time.perf_counter() - start < 2.0  # ~1 ms per image; generous for a shared machine


def test_bad_object_range_is_refused():
    with pytest.raises(ValueError):
        WorldSampler(WorldConfig(), seed=0, min_objects=3, max_objects=2)
    with pytest.raises(ValueError):
        WorldSampler(WorldConfig(), seed=0, max_objects=5)
