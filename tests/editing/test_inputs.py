"""Teacher-forced rows: target lengths, labels and the positions that predict them."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from editing.inputs import TeacherForcedBatch, target_lengths, teacher_forced_batch


def test_labels_are_the_target_tokens(tiny_backbone, tiny_images):
    batch = teacher_forced_batch(tiny_backbone, tiny_images, ["what color is the circle?", "is there a square?"],
                                 ["red", "a large blue square"])
    for row, target in enumerate(["red", "a large blue square"]):
        ids = tiny_backbone.tokenizer(" " + target, add_special_tokens=False).input_ids
        assert batch.labels(row).tolist() == ids
    ends = batch.prompt_ends
    assert (batch.inputs["input_ids"].shape[1] - ends - 1).tolist() == batch.target_lengths


def test_answer_and_sequence_logits_slices():
    inputs = {"input_ids": torch.tensor([[0, 5, 6, 7, 8], [3, 4, 5, 6, 7]]),
              "attention_mask": torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])}
    batch = TeacherForcedBatch(inputs, [2, 1])
    logits = torch.arange(10.0).view(2, 5, 1)  # logit value = flat position
    assert batch.answer_logits(logits, 0).flatten().tolist() == [2.0, 3.0]  # predict tokens 3 and 4
    assert batch.answer_logits(logits, 1).flatten().tolist() == [8.0]
    assert batch.sequence_logits(logits, 0).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]  # padding dropped
    assert batch.labels(0).tolist() == [7, 8]


@dataclass
class _Encoding:
    input_ids: list


class _PieceTokenizer:
    """SentencePiece-like: a text starting with a space gets an extra lone "▁" piece (id 1)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        ids = [1] if text.startswith(" ") else []
        return _Encoding(ids + [100 + len(word) for word in text.split()])


class _Backbone:
    tokenizer = _PieceTokenizer()

    def format_prompt(self, prompt: str, with_image: bool = True) -> str:
        return f"USER: {prompt} ASSISTANT:"


def test_target_length_ignores_the_lone_space_piece():
    backbone = _Backbone()
    assert len(backbone.tokenizer(" red").input_ids) == 2  # what counting " " + target would use
    assert target_lengths(backbone, ["what colour?"], ["red"], True) == [1]
    with pytest.raises(ValueError, match="does not tokenize as a separate suffix"):
        target_lengths(backbone, ["what colour?"], [""], True)
