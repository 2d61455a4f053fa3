"""Up-front record checks: one line naming file, record, field (and path); skip_bad counts."""
from __future__ import annotations

import dataclasses

import pytest

from attrib.backbones.loader import load_backbone
from attrib.data import DataError, load_records
from attrib.prompts import load_prompts
from editing.checks import usable_records


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    return load_backbone("llava", tiny_dirs["llava"])


def _broken(record, **fields):
    return dataclasses.replace(record, fields={**record.fields, **fields})


def test_bad_records_are_named_or_skipped(llava, tiny_world):
    records = load_records(tiny_world / "vqa_eval.json")
    formats = load_prompts()
    assert usable_records(llava, records, "vqa", formats) == (records, [])
    bad = [records[0], _broken(records[1], m_loc="images/gone.png"), _broken(records[2], alt=" ")]
    with pytest.raises(DataError, match=r"vqa_eval.json: record 1, field 'm_loc': image not found: .*gone.png"):
        usable_records(llava, bad, "vqa", formats)
    kept, skipped = usable_records(llava, bad, "vqa", formats, skip_bad=True)
    assert kept == [records[0]] and len(skipped) == 2 and "record 2, field 'alt': empty" in skipped[1]
