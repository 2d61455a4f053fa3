"""Does the model give an answer? Teacher-forced token hits and greedy answers, for any backbone."""
from __future__ import annotations

from typing import Sequence

import torch

from attrib.backbones.loader import Backbone


@torch.no_grad()
def teacher_forced_hits(backbone: Backbone, images, prompts: Sequence[str], targets: Sequence[str]) -> list[list[bool]]:
    """Per row, for each target token: is the argmax at the previous position that token?

    Rows are ``template(prompt) + " " + target`` (left-padded), so every target ends the row.
    """
    inputs = backbone.encode(images, prompts, targets)
    logits = backbone.forward(inputs).logits  # [B, T, V]
    hits = []
    for row, target in enumerate(targets):
        ids = backbone.tokenizer(" " + target, add_special_tokens=False).input_ids
        n = len(ids)
        predicted = logits[row, -n - 1:-1].argmax(-1)
        hits.append((predicted == torch.tensor(ids)).tolist())
    return hits


@torch.no_grad()
def greedy_answers(backbone: Backbone, images, prompts: Sequence[str], max_new_tokens: int = 3) -> list[str]:
    """Greedy generations (prompt stripped, cut at EOS), one per prompt."""
    inputs = backbone.encode(images, prompts)
    generator = backbone.model if images is not None else backbone.module(backbone.spec.text_lm)
    out = generator.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=backbone.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in backbone.tokenizer.batch_decode(new, skip_special_tokens=True)]
