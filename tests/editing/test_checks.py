"""Up-front record checks: one line naming file, record, field (and path); skip_bad counts."""
from __future__ import annotations

import dataclasses

import pytest

from attrib.data import DataError, load_records
from attrib.prompts import load_prompts
from editing.checks import usable_records


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


def test_image_checks_stay_in_the_root_and_read_headers_only(llava, tiny_world, tmp_path, monkeypatch):
    records = load_records(tiny_world / "vqa_eval.json")
    formats = load_prompts()
    outside = tmp_path / "outside.png"
    outside.write_bytes((tiny_world / records[0].image).read_bytes())
    cases = {"../" * 8 + str(outside).lstrip("/"): "leads outside the image root", str(outside): "absolute path"}
    for relative, message in cases.items():
        with pytest.raises(DataError, match=rf"vqa_eval.json: record 0, field 'image_rephrase': .*{message}"):
            usable_records(llava, [_broken(records[0], image_rephrase=relative)], "vqa", formats)
    monkeypatch.setenv("VISEDIT_MAX_IMAGE_PIXELS", "100")  # the world's 64 × 64 images are over it
    with pytest.raises(DataError, match=r"record 0, field 'image': image .* = 4,096 pixels, over the 100-pixel"):
        usable_records(llava, records[:1], "vqa", formats)


@pytest.mark.parametrize("field", ["src", "rephrase", "loc", "m_loc_q"])
def test_prompts_longer_than_the_context_are_refused_not_truncated(llava, tiny_world, field):
    records = load_records(tiny_world / "vqa_eval.json")
    limit = llava.config.text_config.max_position_embeddings
    long = _broken(records[1], **{field: "red " * limit})
    pattern = rf"vqa_eval.json: record 1, field '{field}': prompt, target.* take \d+ positions, more than the " \
              rf"language model's {limit} \(max_position_embeddings\)"
    with pytest.raises(DataError, match=pattern):
        usable_records(llava, [records[0], long], "vqa", load_prompts())
    kept, skipped = usable_records(llava, [records[0], long], "vqa", load_prompts(), skip_bad=True)
    assert kept == [records[0]] and len(skipped) == 1 and "\n" not in skipped[0]
