"""Teacher-forced answer checks: the target's tokens are the suffix the target adds to its prompt."""
from __future__ import annotations

import pytest

from attrib.answers import target_token_ids, teacher_forced_hits


def test_target_ids_are_the_suffix_of_prompt_plus_target(tiny_backbone):
    tokenizer = tiny_backbone.tokenizer
    ids = target_token_ids(tiny_backbone, "what color is the circle?", "red")
    head = tiny_backbone.format_prompt("what color is the circle?")
    assert tokenizer(f"{head} red").input_ids[-len(ids):] == ids
    with pytest.raises(ValueError, match="does not tokenize as a separate suffix"):
        target_token_ids(tiny_backbone, "what color?", "   ")


def test_hits_score_the_positions_before_each_target_token(tiny_backbone, tiny_images):
    prompts, targets = ["what color is the circle?", "what shape?"], ["red", "blue yes"]
    hits = teacher_forced_hits(tiny_backbone, tiny_images, prompts, targets)
    inputs = tiny_backbone.encode(tiny_images, prompts, targets)
    logits = tiny_backbone.forward(inputs).logits
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        ids = target_token_ids(tiny_backbone, prompt, target)
        n = len(ids)
        assert hits[row] == [int(logits[row, -n - 1 + k].argmax()) == ids[k] for k in range(n)]
