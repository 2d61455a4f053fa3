"""The editor interface: what every editing method implements, and the edit request of a record."""
from __future__ import annotations

import pytest

from attrib.data import load_records
from attrib.prompts import load_prompts
from editing.editor import Editor, EditRequest


def test_an_editor_must_implement_edit_and_restore():
    class Half(Editor):
        def edit(self, request):
            return None

    with pytest.raises(TypeError, match="restore"):
        Half()


def test_the_request_of_a_record_uses_the_tasks_prompt_format(tiny_world):
    record = load_records(tiny_world / "vqa_eval.json", n=1)[0]
    request = EditRequest.from_record(record)
    assert request.prompt == load_prompts()["vqa"].format(src=record.src) and request.target == record.alt
    assert request.image.size == record.load_image("image").size
    caption = load_records(tiny_world / "caption_eval.json", n=1)[0]
    assert EditRequest.from_record(caption, task="caption").prompt == caption.src
