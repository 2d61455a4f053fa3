"""Questions, answers, counterfactuals and captions."""
import numpy as np
import pytest

from attrib.world.questions import (
    COUNT_WORDS,
    REGIONS,
    VQA_FAMILIES,
    InfeasibleQuestion,
    answer_pool,
    caption,
    caption_order,
    counterfactual,
    counterfactual_caption,
    evaluate,
    feasible_families,
    region_box,
    rephrase_question,
    sample_question,
)
from attrib.world.scene import COLORS, SHAPES, Scene, WorldConfig, WorldObject, generate_scene
from attrib.world.templates import HELDOUT, TRAIN, match_template


def _scenes(seed: int, n: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [generate_scene(rng, WorldConfig()) for _ in range(n)]


def _obj(shape, color, box, size="small"):
    return WorldObject(shape, color, size, box, COLORS[color])


def _check_answer(scene: Scene, q) -> None:
    """Re-derive the answer from the scene independently of `evaluate`."""
    objs = scene.objects
    target = objs[q.target] if q.target is not None else None
    if q.family == "color_of_shape":
        assert [o.shape for o in objs].count(q.slots["shape"]) == 1
        assert target.shape == q.slots["shape"] and q.answer == target.color
    elif q.family == "shape_of_color":
        assert [o.color for o in objs].count(q.slots["color"]) == 1
        assert target.color == q.slots["color"] and q.answer == target.shape
    elif q.family == "count":
        assert q.answer == COUNT_WORDS[len(objs) - 1] and target is None
    elif q.family == "position":
        rx0, ry0, rx1, ry1 = region_box(q.slots["region"])
        x0, y0, x1, y1 = target.box
        assert rx0 <= x0 and x1 <= rx1 and ry0 <= y0 and y1 <= ry1
        for k, o in enumerate(objs):
            if k != q.target:  # no other object even touches the region
                assert o.box[2] <= rx0 or o.box[0] >= rx1 or o.box[3] <= ry0 or o.box[1] >= ry1
        assert q.answer == target.shape
    elif q.family == "exists":
        present = [(o.color, o.shape) for o in objs].count((q.slots["color"], q.slots["shape"]))
        assert q.answer == ("yes" if present else "no")
        assert (target is not None) == (q.answer == "yes")


def test_sampled_questions_are_right_one_word_and_train_only():
    rng = np.random.default_rng(0)
    seen_families = set()
    for scene in _scenes(0, 300):
        q = sample_question(scene, rng, split=TRAIN)
        seen_families.add(q.family)
        template = match_template(q.text, q.family)
        assert template is not None and template.split == TRAIN and template.key == q.template
        assert q.answer in answer_pool(q.family) and q.answer.isalpha() and q.answer.islower()
        _check_answer(scene, q)
        assert q.box(scene) == (None if q.target is None else scene.objects[q.target].box)
    assert seen_families == set(VQA_FAMILIES)


@pytest.mark.parametrize("family", VQA_FAMILIES)
def test_each_family_in_both_splits(family):
    rng = np.random.default_rng(1)
    for scene in _scenes(1, 60):
        if family not in feasible_families(scene):
            with pytest.raises(InfeasibleQuestion):
                sample_question(scene, rng, family)
            continue
        for split in (TRAIN, HELDOUT):
            q = sample_question(scene, rng, family, split)
            assert match_template(q.text, family).split == split
            _check_answer(scene, q)


def test_exists_answers_are_balanced():
    rng = np.random.default_rng(2)
    answers = [sample_question(s, rng, "exists").answer for s in _scenes(2, 400)]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_ill_posed_questions_are_refused():
    twins = Scene((_obj("circle", "red", (0, 0, 16, 16)), _obj("circle", "red", (32, 32, 48, 48))), 0)
    rng = np.random.default_rng(0)
    for family in ("color_of_shape", "shape_of_color"):
        with pytest.raises(InfeasibleQuestion):
            sample_question(twins, rng, family)
    assert evaluate(twins, "exists", {"color": "red", "shape": "circle"}) is None  # two matches: no single box
    assert evaluate(twins, "position", {"region": "top left"}) == ("circle", 0)
    assert evaluate(twins, "position", {"region": "bottom right"}) == ("circle", 1)
    poking = Scene((_obj("circle", "red", (0, 0, 16, 16)), _obj("cross", "green", (24, 8, 40, 24))), 0)
    assert evaluate(poking, "position", {"region": "top left"}) is None  # the cross reaches into it
    assert evaluate(poking, "position", {"region": "bottom half"}) is None  # nothing there
    straddle = Scene((_obj("square", "blue", (24, 24, 40, 40)),), 0)
    assert all(evaluate(straddle, "position", {"region": r}) is None for r in REGIONS)


def test_rephrase_keeps_the_question_in_a_heldout_template():
    rng = np.random.default_rng(3)
    for scene in _scenes(3, 100):
        q = sample_question(scene, rng)
        r = rephrase_question(q, rng)
        assert match_template(r.text, q.family).split == HELDOUT
        assert (r.answer, r.target, r.slots) == (q.answer, q.target, q.slots) and r.text != q.text


@pytest.mark.parametrize("family", VQA_FAMILIES)
def test_counterfactual_is_another_answer_of_the_same_type(family):
    rng = np.random.default_rng(4)
    for answer in answer_pool(family):
        for _ in range(5):
            alt = counterfactual(answer, family, rng)
            assert alt != answer and alt in answer_pool(family)
    assert counterfactual("yes", "exists", rng) == "no"
    with pytest.raises(ValueError):
        counterfactual("purple", "count", rng)


def test_caption_lists_objects_left_to_right():
    scene = Scene((
        _obj("square", "blue", (40, 0, 64, 24), "large"),
        _obj("circle", "red", (0, 40, 16, 56)),
    ), 0)
    assert caption(scene) == "a small red circle and a large blue square"
    for s in _scenes(5, 100):
        xs = [s.objects[k].center[0] for k in caption_order(s)]
        assert xs == sorted(xs)
        assert caption(s).count(" and ") == len(s.objects) - 1


def test_counterfactual_caption_changes_exactly_one_word():
    rng = np.random.default_rng(6)
    vocab = set(COLORS) | set(SHAPES) | {"small", "large"}
    for scene in _scenes(6, 200):
        true, alt = caption(scene).split(), counterfactual_caption(scene, rng).split()
        assert len(true) == len(alt)
        diff = [(a, b) for a, b in zip(true, alt) if a != b]
        assert len(diff) == 1 and diff[0][1] in vocab
