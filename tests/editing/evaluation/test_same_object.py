"""The M-Loc same-object rule: hand-made scenes per family, and the rebuild from a world folder."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from attrib.data import load_records
from attrib.world import Question, Scene, WorldObject, WorldRecord
from editing.evaluation.same_object import WorldSameObject, edited_object_in_m_loc


def _obj(shape: str, color: str, box=(0, 0, 16, 16)) -> WorldObject:
    return WorldObject(shape, color, "small", box, (0, 0, 0))


def _record(question: Question | None, image: list, m_loc: list, pred: str = "", alt: str = "") -> WorldRecord:
    scenes = {"image": Scene(tuple(image), 0), "image_rephrase": Scene(tuple(image), 1),
              "m_loc": Scene(tuple(m_loc), 2)}
    fields = {"pred": pred, "alt": alt}
    family = question.family if question else "caption"
    return WorldRecord("vqa_eval", 0, family, fields, scenes, {}, question, question)


@pytest.mark.parametrize("slots, m_loc, expected", [
    ({"shape": "square"}, [_obj("square", "green")], True),  # colour_of_shape: any square
    ({"shape": "square"}, [_obj("circle", "red")], False),
    ({"color": "red"}, [_obj("circle", "red")], True),  # shape_of_color: any red object
    ({"color": "red", "shape": "square"}, [_obj("square", "blue"), _obj("circle", "red")], False),  # exists: both
    ({"region": "top left"}, [_obj("cross", "blue", (0, 0, 16, 16))], True),  # position: inside the region
    ({"region": "top left"}, [_obj("cross", "blue", (24, 0, 40, 16))], False),  # pokes out of it
    ({}, [_obj("square", "red")], None),  # count: names no object
])
def test_vqa_rule(slots, m_loc, expected):
    question = Question("q", "text", "answer", 0, slots)
    assert edited_object_in_m_loc(_record(question, [_obj("square", "red")], m_loc)) is expected


def test_caption_rule_uses_the_changed_object():
    image = [_obj("circle", "red", (0, 0, 16, 16)), _obj("square", "blue", (40, 0, 56, 16))]
    pred = "a small red circle and a small blue square"
    alt = "a small red circle and a small green square"  # the blue square is edited
    assert edited_object_in_m_loc(_record(None, image, [_obj("square", "blue")], pred, alt)) is True
    assert edited_object_in_m_loc(_record(None, image, [_obj("circle", "red")], pred, alt)) is False


def test_world_folder_rebuild_matches_and_refuses_other_data(tiny_world, tmp_path):
    rule = WorldSameObject()
    for split in ("vqa_eval", "caption_eval"):
        records = load_records(tiny_world / f"{split}.json")
        for record in records:  # rebuilt fields matched: only count questions (no named object) give None
            assert (rule(record) is None) == (record.truth["family"] == "count")
    record = load_records(tiny_world / "vqa_eval.json")[0]
    tampered = dataclasses.replace(record, fields={**record.fields, "m_loc_q": "something else?"})
    assert rule(tampered) is None
    copy = tmp_path / "vqa_eval.json"  # the same JSON without the world's meta.json beside it
    shutil.copy(tiny_world / "vqa_eval.json", copy)
    assert all(rule(r) is None for r in load_records(copy, image_root=tiny_world))
    assert json.loads((tiny_world / "meta.json").read_text())["seed"] == 0
