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

truth.json does not list the M-Loc scene's objects, so the rule works on the records rebuilt from the
world's ``meta.json`` (`attrib.world.rebuild`); anything else, e.g. real MMEdit data, gives None.
"""
from __future__ import annotations

from attrib.data import EditRecord
from attrib.world import WorldObject, WorldRecord
from attrib.world.questions import CAPTION_JOINER, caption_order, region_box
from attrib.world.rebuild import WorldRebuild


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
    """``same_object(record)`` for records of a world folder written by `write_world`; None elsewhere
    (the records are rebuilt by `attrib.world.rebuild.WorldRebuild`)."""

    def __init__(self):
        self.rebuild = WorldRebuild()

    def __call__(self, record: EditRecord) -> bool | None:
        world_record = self.rebuild.world_record(record)
        return None if world_record is None else edited_object_in_m_loc(world_record)
