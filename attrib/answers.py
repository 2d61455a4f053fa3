"""Does the model give an answer? Teacher-forced token hits and greedy answers, for any backbone."""
from __future__ import annotations

from typing import Sequence

import torch

from attrib.backbones.loader import Backbone


def target_token_ids(backbone: Backbone, prompt: str, target: str, with_image: bool = True) -> list[int]:
    """The token ids ``target`` adds to ``template(prompt)`` in the row ``template(prompt) + " " + target``:
    the suffix of the row's ids after the prompt's (tokenizers that merge across the space, such as
    SentencePiece's, give other ids than ``target`` tokenized alone). Refused when the target does not
    tokenize as a separate suffix, since the scored positions would not be known."""
    tokenizer = backbone.tokenizer
    head = backbone.format_prompt(prompt, with_image=with_image)
    prefix = tokenizer(head).input_ids
    full = tokenizer(f"{head} {target}").input_ids
    if not target.strip() or len(full) <= len(prefix) or full[:len(prefix)] != prefix:
        raise ValueError(f"target {target!r} does not tokenize as a separate suffix of prompt {prompt!r}; "
                         "cannot tell which positions to score")
    return full[len(prefix):]


@torch.no_grad()
def teacher_forced_hits(backbone: Backbone, images, prompts: Sequence[str], targets: Sequence[str]) -> list[list[bool]]:
    """Per row, for each target token: is the argmax at the previous position that token?

    Rows are ``template(prompt) + " " + target`` (left-padded), so every target ends the row.
    """
    inputs = backbone.encode(images, prompts, targets)
    logits = backbone.forward(inputs).logits  # [B, T, V]
    hits = []
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        ids = target_token_ids(backbone, prompt, target, with_image=images is not None)
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
