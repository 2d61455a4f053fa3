"""Up-front checks of MMEdit records, so a bad record stops a run before hours of training, by name.

Each check raises `attrib.data.DataError` with one line naming the file, the record index, the field
and (for images) the path. `usable_records` applies them to a list: it stops at the first bad record,
or with ``skip_bad`` keeps the good ones and returns one line per skipped record.

Checked: the three image paths stay inside the image root, the files exist and have a readable header
within the pixel limit (pixels are decoded later, lazily); ``src``, ``rephrase``, ``alt``, ``loc``,
``loc_ans``, ``m_loc_q`` and ``m_loc_a`` are non-empty; every scored row (edit and rephrase prompts with
``alt``, ``loc`` with ``loc_ans``, ``m_loc_q`` with ``m_loc_a``) fits the language model's context with
its image tokens (`attrib.data.check_prompt_length`), and its target tokenizes as a separate suffix of its
prompt, so the scored positions are known.
"""
from __future__ import annotations

from typing import Sequence

from attrib.backbones.loader import Backbone
from attrib.data import IMAGE_FIELDS, DataError, EditRecord, check_prompt_length
from editing.inputs import target_lengths

TEXT_FIELDS = ("src", "rephrase", "alt", "loc", "loc_ans", "m_loc_q", "m_loc_a")


def _fail(record: EditRecord, field: str, why: str) -> DataError:
    return DataError(f"{record.source}: record {record.index}, field {field!r}: {why}")


def check_record(backbone: Backbone, record: EditRecord, task: str, formats: dict[str, str]) -> None:
    """Raise a one-line DataError for the first problem of ``record`` (module docstring)."""
    for field in IMAGE_FIELDS:
        record.image_size(field)  # inside the image root, readable header, within the pixel limit
    for field in TEXT_FIELDS:
        if not record.fields[field].strip():
            raise _fail(record, field, "empty")
    edit = formats[task]
    # (prompt field, target field, row prompt, target, with an image)
    scored = [("src", "alt", edit.format(src=record.src), record.alt, True),
              ("rephrase", "alt", edit.format(src=record.rephrase), record.alt, True),
              ("loc", "loc_ans", formats["loc"].format(loc=record.loc), record.loc_ans, False),
              ("m_loc_q", "m_loc_a", formats["m_loc"].format(m_loc_q=record.m_loc_q), record.m_loc_a, True)]
    for prompt_field, field, prompt, target, with_image in scored:
        check_prompt_length(backbone, record, prompt_field, prompt, target, with_image)
        try:
            target_lengths(backbone, [prompt], [target], with_image)
        except ValueError as error:
            raise _fail(record, field, str(error)) from None


def usable_records(backbone: Backbone, records: Sequence[EditRecord], task: str, formats: dict[str, str],
                   skip_bad: bool = False) -> tuple[list[EditRecord], list[str]]:
    """(good records, one message per skipped record); without ``skip_bad`` the first bad record raises."""
    kept, skipped = [], []
    for record in records:
        try:
            check_record(backbone, record, task, formats)
        except DataError as error:
            if not skip_bad:
                raise
            skipped.append(str(error))
            continue
        kept.append(record)
    return kept, skipped
