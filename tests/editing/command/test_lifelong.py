"""The lifelong test split: edits with distinct scenes drawn in file order, and its sharing statistics."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from attrib.data import DataError, load_records
from attrib.world import write_world
from attrib.world.rebuild import WorldRebuild
from editing.command import compare
from editing.command.lifelong import POOL, distinct_scenes, image_sharing


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("life") / "w", seed=3, n_train=4, n_eval=60, n_caption_train=1,
                       n_caption_eval=1)


def _keys(records):
    rebuild = WorldRebuild()
    worlds = [rebuild.world_record(r) for r in records]
    return [w.scenes["image"].object_key() for w in worlds], [w.scenes["m_loc"].object_key() for w in worlds]


def test_distinct_scenes_keeps_edits_and_m_loc_images_apart_in_file_order(world):
    records = load_records(world / "vqa_eval.json")
    edits, m_locs = _keys(records)
    assert len(set(edits)) < len(edits)  # the raw split repeats scenes: the filter has work to do
    chosen = distinct_scenes(records, 12)
    picked = [r.index for r in chosen]
    assert picked == sorted(picked) and len(picked) == 12
    kept_edits, kept_m_locs = _keys(chosen)
    assert len(set(kept_edits)) == 12 and not set(kept_edits) & set(kept_m_locs)
    # greedy: every record skipped before the last pick clashes with a record picked before it
    for index in range(picked[-1]):
        if index in picked:
            continue
        before = [i for i in picked if i < index]
        clash = {edits[i] for i in before} | {m_locs[i] for i in before}
        assert edits[index] in clash or m_locs[index] in {edits[i] for i in before} or edits[index] == m_locs[index]


def test_distinct_scenes_refuses_too_few_records_and_non_world_files(world, tmp_path):
    records = load_records(world / "vqa_eval.json")
    with pytest.raises(DataError, match=r"vqa_eval.json: only \d+ of its 60 records have distinct scenes, 60"):
        distinct_scenes(records, 60)
    copy = tmp_path / "vqa_eval.json"
    shutil.copy(world / "vqa_eval.json", copy)
    shutil.copytree(world / "images", tmp_path / "images")
    with pytest.raises(DataError, match="not an unchanged world split"):
        distinct_scenes(load_records(copy), 3)


def test_image_sharing_counts_scenes_of_world_records(world, tmp_path):
    records = load_records(world / "vqa_eval.json")[:30]
    shared = image_sharing(records)
    edits, m_locs = _keys(records)
    counts = Counter(edits)
    assert shared["distinct_images"] == 30 and shared["edits_sharing_an_image"] == 0
    assert shared["distinct_scenes"] == len(counts)
    assert shared["edits_sharing_a_scene"] == sum(n for n in counts.values() if n > 1)
    assert shared["m_loc_on_an_edit_scene"] == sum(m in counts for m in m_locs)
    assert sum(shared["objects_per_edit"].values()) == 30
    copy = tmp_path / "plain.json"  # not a world split: file statistics only
    copy.write_text(json.dumps([r.fields for r in records]))
    shutil.copytree(world / "images", tmp_path / "images")
    assert "distinct_scenes" not in image_sharing(load_records(copy))


def test_lifelong_test_role_draws_distinct_scenes_from_a_larger_world(world, monkeypatch):
    asked = []

    def small_world(seed, root, n_eval=None):
        asked.append((seed, n_eval))
        return world

    monkeypatch.setattr(compare, "_world", small_world)
    roles = compare.data_roles(compare.CompareOptions(edits=(1, 5), test_seed=2))
    assert asked == [(1, None), (2, POOL * 5)]
    assert [r.index for r in roles.test] == [r.index for r in distinct_scenes(load_records(world / "vqa_eval.json"), 5)]
    assert "distinct scenes" in roles.described["test"]["chosen"]
