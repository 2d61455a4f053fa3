"""The in-memory world records behind the records of a world folder: scenes and questions, not just text.

``truth.json`` keeps the asked-about object's box per image, but not every object of every scene (an
M-Loc image's objects, or what a counterfactual of the edit image would look like). A world folder's
``meta.json`` holds the seed, the counts and the config `write_world` used, so its records can be rebuilt
exactly; a rebuilt record is used only when its 11 fields equal the file's (anything else, e.g. real
MMEdit data or an edited file, gives None).
"""
from __future__ import annotations

import json
from pathlib import Path

from attrib.data import EditRecord
from attrib.world.dataset import SPLITS, WorldRecord, build_split
from attrib.world.scene import WorldConfig

_TRAIN_SPLITS = ("vqa_train", "caption_train")


class WorldRebuild:
    """``world_record(record)`` for records of a world folder written by `write_world`; None elsewhere.

    Rebuilding costs about 1 ms per record (scenes, not images) and is done once per folder and split.
    """

    def __init__(self):
        self._splits: dict[tuple[Path, str], list[WorldRecord] | None] = {}
        self._train_layouts: dict[Path, frozenset] = {}

    def world_record(self, record: EditRecord) -> WorldRecord | None:
        """The world record (scenes, question) behind ``record``, or None when ``record`` is not an
        unchanged record of a world folder."""
        rebuilt = self._records(record.source.parent, record.source.stem)
        if rebuilt is None or record.index >= len(rebuilt):
            return None
        world_record = rebuilt[record.index]
        return world_record if world_record.fields == record.fields else None

    def _records(self, folder: Path, split: str) -> list[WorldRecord] | None:
        key = (folder, split)
        if key not in self._splits:
            self._splits[key] = self._rebuild(folder, split)
        return self._splits[key]

    def _rebuild(self, folder: Path, split: str) -> list[WorldRecord] | None:
        meta_file = folder / "meta.json"
        if split not in SPLITS or not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        config = WorldConfig(**meta["config"])
        avoid = frozenset()
        if split not in _TRAIN_SPLITS:  # write_world redraws eval scenes that repeat a training layout
            if folder not in self._train_layouts:
                layouts = set()
                for train in _TRAIN_SPLITS:
                    records = self._records(folder, train) or []
                    layouts.update(r.scenes["image"].layout_key() for r in records)
                self._train_layouts[folder] = frozenset(layouts)
            avoid = self._train_layouts[folder]
        # Folders written before novel targets existed hold none.
        return build_split(meta["seed"], split, meta["counts"][split], config, avoid, meta.get("novel_share", 0.0))
