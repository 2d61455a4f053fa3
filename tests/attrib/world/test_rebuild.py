"""Rebuilding a world folder's records (scenes and questions) from its meta.json."""
from __future__ import annotations

import json

from attrib.data import load_records
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
