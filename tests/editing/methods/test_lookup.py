"""The lookup control: answers the edit's target on the edit image, nothing elsewhere, exact restore."""
from __future__ import annotations

import pytest
import torch

from attrib.data import load_records
from editing.editor import EditRequest
from editing.evaluation.metrics import predict_rows
from editing.methods import MethodContext, build_method


@pytest.fixture(scope="module")
def records(tiny_world):
    return load_records(tiny_world / "vqa_eval.json")


def test_forces_the_target_on_the_edit_image_only(tiny_backbone, records):
    lookup = build_method("lookup", MethodContext(tiny_backbone))
    report = lookup.prepare(records, records)
    assert report["n_dev"] == len(records) and "threshold" in report["dev_split"]
    record = records[0]
    image, prompt = record.load_image("image"), EditRequest.from_record(record).prompt
    view = lookup.backbone
    before_text = view.forward(view.encode(None, ["a question?"])).logits
    before = view.forward(view.encode([image], [prompt])).logits
    lookup.edit(EditRequest(image, prompt, "turquoise"))  # a multi-token target: every token is forced
    hit = predict_rows(view, [image], [prompt], ["turquoise"], k=1)[0]
    assert torch.equal(hit.answer_argmax, hit.labels) and len(hit.labels) > 1
    assert torch.equal(view.forward(view.encode(None, ["a question?"])).logits, before_text)
    lookup.restore()
    assert torch.equal(view.forward(view.encode([image], [prompt])).logits, before)


def test_an_unrelated_image_is_left_alone(tiny_backbone, records):
    lookup = build_method("lookup", MethodContext(tiny_backbone))
    lookup.prepare(records, records)
    lookup.threshold = 1.0 + 1e-6  # nothing can match: the view must then be the backbone
    view = lookup.backbone
    image = records[1].load_image("m_loc")
    before = view.forward(view.encode([image], ["what?"], ["red"])).logits
    lookup.edit(EditRequest.from_record(records[0]))
    assert torch.equal(view.forward(view.encode([image], ["what?"], ["red"])).logits, before)


def test_a_batch_at_a_noted_batchs_address_reads_no_lengths(tiny_backbone, records):
    """A note belongs to one encoded tensor. A later batch that sits at the same storage address (the
    allocator hands a freed batch's memory to the next) and holds another number of rows must not read it;
    `expand` puts a two-row batch at the noted one-row batch's address."""
    lookup = build_method("lookup", MethodContext(tiny_backbone))
    lookup.prepare(records, records)
    view = lookup.backbone
    image, prompt = records[0].load_image("image"), EditRequest.from_record(records[0]).prompt
    lookup.edit(EditRequest(image, prompt, "turquoise"))
    two = view.encode([image, image], [prompt, prompt], ["turquoise", "turquoise"])
    one = view.encode([image], [prompt], ["turquoise"])  # the note now belongs to this batch
    two["input_ids"] = one["input_ids"].expand(2, -1)
    assert two["input_ids"].data_ptr() == one["input_ids"].data_ptr()
    logits = view.forward(two).logits  # not noted: one forced token, at the last position
    assert (logits[:, -1].argmax(-1) == lookup.stored[0]["ids"][0]).all()
