"""Does the M-Loc image contain the edited object? The rule behind ``m_loc_same_object`` / ``m_loc_other``.

An unrelated (M-Loc) image that happens to show the thing the edit is about is the hard case for the
IM gate, so M-Loc is reported split by it. Any callable ``same_object(record) -> bool | None`` can be
passed to the evaluation (None = unknown, left out of both splits); `WorldSameObject` is the rule for
the synthetic world:

- VQA: the edit question names its object by slots (a shape, a colour, both, or a region). The M-Loc
  scene "contains the edited object" when one of its objects fits every named slot (region: the
  object's box lies inside it). Count questions name no object: None.
- Captions: the edit changes one attribute of one object; the M-Loc scene contains it when one of its
  objects has that object's original colour and shape.

truth.json does not list the M-Loc scene's objects, so the rule rebuilds the records from the world's
``meta.json`` (seed, counts, config), exactly as `write_world` made them, and uses a rebuilt record only
when its 11 fields equal the file's (anything else, e.g. real MMEdit data, gives None).
"""
from __future__ import annotations

import json
from pathlib import Path

from attrib.data import EditRecord
from attrib.world import SPLITS, WorldConfig, WorldObject, WorldRecord, build_split
from attrib.world.questions import CAPTION_JOINER, caption_order, region_box

_TRAIN_SPLITS = ("vqa_train", "caption_train")


def _fits(obj: WorldObject, slots: dict[str, str], image_size: int) -> bool:
    if "shape" in slots and obj.shape != slots["shape"]:
        return False
    if "color" in slots and obj.color != slots["color"]:
        return False
    if "region" in slots:
        x0, y0, x1, y1 = region_box(slots["region"], image_size)
        b = obj.box
        if not (x0 <= b[0] and y0 <= b[1] and b[2] <= x1 and b[3] <= y1):
            return False
    return True


def edited_object_in_m_loc(record: WorldRecord) -> bool | None:
    """The rule of the module docstring on an in-memory world record."""
    m_scene = record.scenes["m_loc"]
    if record.question is not None:
        slots = record.question.slots
        if not slots:
            return None
        return any(_fits(o, slots, m_scene.image_size) for o in m_scene.objects)
    scene = record.scenes["image"]
    before = record.fields["pred"].split(CAPTION_JOINER)
    after = record.fields["alt"].split(CAPTION_JOINER)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if len(changed) != 1 or len(before) != len(after):
        return None
    edited = scene.objects[caption_order(scene)[changed[0]]]
    return any((o.color, o.shape) == (edited.color, edited.shape) for o in m_scene.objects)


class WorldSameObject:
    """``same_object(record)`` for records of a world folder written by `write_world`; None elsewhere.

    Rebuilding costs about 1 ms per record (scenes, not images) and is done once per folder and split.
    """

    def __init__(self):
        self._splits: dict[tuple[Path, str], list[WorldRecord] | None] = {}
        self._train_layouts: dict[Path, frozenset] = {}

    def __call__(self, record: EditRecord) -> bool | None:
        world_record = self.world_record(record)
        return None if world_record is None else edited_object_in_m_loc(world_record)

    def world_record(self, record: EditRecord) -> WorldRecord | None:
        """The in-memory world record (scenes, question) behind ``record``, or None when ``record`` is
        not an unchanged record of a world folder. Also used by `attrib.ceiling` for counterfactuals."""
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
        return build_split(meta["seed"], split, meta["counts"][split], config, avoid)
