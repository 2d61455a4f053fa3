"""Rebuilding a world folder's records (scenes and questions) from its meta.json, and refusing a malformed one."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from attrib.data import load_records
from attrib.errors import ArtifactError
from attrib.world import write_world
from attrib.world.rebuild import WorldRebuild


def test_rebuilt_records_are_the_files_records(tmp_path):
    world = write_world(tmp_path / "w", seed=2, n_train=3, n_eval=4, n_caption_train=2, n_caption_eval=2)
    rebuild = WorldRebuild()
    for split in ("vqa_eval", "caption_eval", "vqa_train"):
        for record in load_records(world / f"{split}.json"):
            rebuilt = rebuild.world_record(record)
            assert rebuilt is not None and rebuilt.fields == record.fields
            assert (rebuilt.question is None) == split.startswith("caption")


def test_an_edited_record_or_a_folder_without_meta_gives_none(tmp_path):
    world = write_world(tmp_path / "w", seed=2, n_train=1, n_eval=2, n_caption_train=1, n_caption_eval=1)
    records = json.loads((world / "vqa_eval.json").read_text())
    records[0]["alt"] = "something else"
    (world / "vqa_eval.json").write_text(json.dumps(records))
    edited, untouched = load_records(world / "vqa_eval.json")
    rebuild = WorldRebuild()
    assert rebuild.world_record(edited) is None and rebuild.world_record(untouched) is not None
    (world / "meta.json").unlink()
    assert WorldRebuild().world_record(untouched) is None


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("meta") / "w", seed=2, n_train=1, n_eval=2, n_caption_train=1,
                       n_caption_eval=1)


def _rebuilt_or_named(world, meta: bytes):
    """The rebuilt record 0 of vqa_eval under ``meta``, or the one-line ArtifactError naming meta.json."""
    meta_file = world / "meta.json"
    original = meta_file.read_bytes()
    meta_file.write_bytes(meta)
    try:
        return WorldRebuild().world_record(load_records(world / "vqa_eval.json")[0])
    except ArtifactError as error:
        assert len(str(error).splitlines()) == 1 and str(meta_file) in str(error), str(error)
        return error
    finally:
        meta_file.write_bytes(original)


def _meta(world, **changes) -> bytes:
    meta = json.loads((world / "meta.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del meta[key]
        else:
            meta[key] = value
    return json.dumps(meta).encode()


@pytest.mark.parametrize("meta,message", [
    (lambda w: b"[]", "expected an object, found a list"),
    (lambda w: b'{"seed": 2, "counts": {', "not valid JSON"),
    (lambda w: b"\xff{}", "not UTF-8 text at byte 0"),
    (lambda w: _meta(w, seed=...), "missing field 'seed'"),
    (lambda w: _meta(w, seed="2"), r"field 'seed': expected a whole number, found a string"),
    (lambda w: _meta(w, seed=-1), r"field 'seed': -1 is negative"),
    (lambda w: _meta(w, counts={"vqa_train": 1}), r"field 'counts': missing field 'vqa_eval'"),
    (lambda w: _meta(w, counts={"vqa_train": 1, "caption_train": 1, "vqa_eval": 10**12}),
     r"field 'counts', 'vqa_eval': 1000000000000 is not in \[0, 100,000\]"),
    (lambda w: _meta(w, config=[64, 8]), r"field 'config': expected an object, found a list"),
    (lambda w: _meta(w, config={"image_size": 64, "shape": 3}), r"field 'config': unknown setting 'shape'"),
    (lambda w: _meta(w, config={"image_size": 64.5}), r"field 'config', field 'image_size': expected a whole number"),
    (lambda w: _meta(w, config={"patch_size": 0}), r"field 'config', 'patch_size': 0 is not in \[1, 4096\]"),
    (lambda w: _meta(w, config={"image_size": 60}), r"field 'config': image_size 60 is not a multiple of patch_size"),
    (lambda w: _meta(w, config={"image_size": 4096, "patch_size": 1}), r"4096 patches a side, over the 64"),
    (lambda w: _meta(w, config={"gap_patches": 7}), r"field 'config': cannot place"),
    (lambda w: _meta(w, novel_share="a lot"), r"field 'novel_share': expected a number"),
    (lambda w: _meta(w, novel_share=2.0), r"field 'novel_share': 2.0 is not in \[0, 0.8\]"),
])
def test_malformed_meta_is_named(small_world, meta, message):
    result = _rebuilt_or_named(small_world, meta(small_world))
    assert isinstance(result, ArtifactError) and re.search(message, str(result)), result


def test_meta_without_novel_share_still_rebuilds(small_world):
    assert _rebuilt_or_named(small_world, _meta(small_world, novel_share=...)) is not None


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=9), inner, max_size=3),
                    max_leaves=6)
CONFIGS = st.dictionaries(st.sampled_from(["image_size", "patch_size", "small_patches", "large_patches",
                                           "min_objects", "max_objects", "gap_patches", "color_jitter"]),
                          st.integers(-2, 70) | JSON, max_size=3)


@given(key=st.sampled_from(["seed", "counts", "config", "novel_share", "box_format"]), value=CONFIGS | JSON,
       delete=st.integers(0, 5).map(lambda k: k == 0))
def test_fuzz_meta_one_field_replaced(small_world, key, value, delete):
    result = _rebuilt_or_named(small_world, _meta(small_world, **{key: ... if delete else value}))
    event(type(result).__name__)


@given(at=st.integers(0, 1 << 14), flips=st.lists(st.integers(0, 1 << 17), max_size=3))
def test_fuzz_meta_damaged_bytes(small_world, at, flips):
    data = bytearray((small_world / "meta.json").read_bytes()[:at])
    for bit in flips if data else []:
        data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
    event(type(_rebuilt_or_named(small_world, bytes(data))).__name__)
