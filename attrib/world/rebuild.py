"""The in-memory world records behind the records of a world folder: scenes and questions, not just text.

``truth.json`` keeps the asked-about object's box per image, but not every object of every scene (an
M-Loc image's objects, or what a counterfactual of the edit image would look like). A world folder's
``meta.json`` holds the seed, the counts and the config `write_world` used, so its records can be rebuilt
exactly; a rebuilt record is used only when its 11 fields equal the file's (anything else, e.g. real
MMEdit data or an edited file, gives None). A malformed ``meta.json`` raises `ArtifactError` naming the
file and field.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from attrib.data import EditRecord
from attrib.errors import ArtifactError
from attrib.io import read_json, require
from attrib.world.dataset import MAX_NOVEL_SHARE, SPLITS, WorldRecord, build_split
from attrib.world.scene import WorldConfig

_TRAIN_SPLITS = ("vqa_train", "caption_train")
_CONFIG_MINIMUM = {"gap_patches": 0, "color_jitter": 0}  # every other WorldConfig setting is a positive size
# Bounds on what a meta.json may ask to rebuild (~1 ms a record; scene placement scans the patch grid).
MAX_COUNT = 100_000
MAX_SETTING = 4096
MAX_GRID = 64  # patches a side (the default world has 8)


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
        seed, count, config, novel_share = read_meta(meta_file, split)
        avoid = frozenset()
        if split not in _TRAIN_SPLITS:  # write_world redraws eval scenes that repeat a training layout
            if folder not in self._train_layouts:
                layouts = set()
                for train in _TRAIN_SPLITS:
                    records = self._records(folder, train) or []
                    layouts.update(r.scenes["image"].layout_key() for r in records)
                self._train_layouts[folder] = frozenset(layouts)
            avoid = self._train_layouts[folder]
        try:
            return build_split(seed, split, count, config, avoid, novel_share)
        except RuntimeError as error:  # a config whose objects cannot be placed
            raise ArtifactError(f"{meta_file}, field 'config': {error}") from None


def read_meta(path: Path, split: str) -> tuple[int, int, WorldConfig, float]:
    """(seed, record count of ``split``, world config, novel-target share) from a world's ``meta.json``;
    anything malformed raises `ArtifactError` naming the file and field."""
    meta = read_json(path, "world meta.json (an object)", ArtifactError)
    where = str(path)
    seed = require(meta, "seed", int, where)
    counts = require(meta, "counts", dict, where)
    count = require(counts, split, int, f"{where}, field 'counts'")
    settings = require(meta, "config", dict, where)
    # Folders written before novel targets existed hold none.
    novel_share = require(meta, "novel_share", float, where, default=0.0)
    if seed < 0:
        raise ArtifactError(f"{where}, field 'seed': {seed} is negative")
    if not 0 <= count <= MAX_COUNT:
        raise ArtifactError(f"{where}, field 'counts', {split!r}: {count} is not in [0, {MAX_COUNT:,}]")
    if not 0.0 <= novel_share <= MAX_NOVEL_SHARE:
        raise ArtifactError(f"{where}, field 'novel_share': {novel_share} is not in [0, {MAX_NOVEL_SHARE}]")
    known = {f.name for f in fields(WorldConfig)}
    for key in settings:
        if key not in known:
            raise ArtifactError(f"{where}, field 'config': unknown setting {key!r:.80}")
        value = require(settings, key, int, f"{where}, field 'config'")
        low, high = _CONFIG_MINIMUM.get(key, 1), MAX_SETTING
        if not low <= value <= high:
            raise ArtifactError(f"{where}, field 'config', {key!r}: {value} is not in [{low}, {high}]")
    try:
        config = WorldConfig(**settings)
    except ValueError as error:
        raise ArtifactError(f"{where}, field 'config': {error}") from None
    if config.grid > MAX_GRID:
        raise ArtifactError(f"{where}, field 'config': image_size / patch_size = {config.grid} patches a side, "
                            f"over the {MAX_GRID} a rebuild allows")
    return seed, count, config, novel_share
