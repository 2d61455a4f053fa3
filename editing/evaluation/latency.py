"""How much slower an edited model answers: the forward alone, edited against unedited.

    before = forward_seconds(editor, images, prompts)   # restored
    ... edits applied ...
    edited = forward_seconds(editor, images, prompts)
    ... restored ...
    ratio = latency_ratio(edited, before, forward_seconds(editor, images, prompts))

The inputs are encoded once per measurement, outside the clock, by the editor's backbone of the moment (a
method's own share as deployed: an adapter with its routing, a prompt lengthened by demonstrations); the
clock covers `Backbone.forward` only. A measurement is the shortest of ``repeats`` forwards after
``WARMUP`` untimed ones: the run least disturbed by the rest of the machine, the statistic `timeit`
recommends. Medians of 11 runs on one input, which the lifelong comparison first reported, put the
unedited model at 0.75–1.56× itself while a second job shared the two cores (BLIP-2 default, a 20 ms
forward; `docs/experiments/lifelong.md`). The unedited time is the mean of one measurement before the
edits and one after their restore, so a slow drift of the machine between them does not read as the
edits' cost.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from editing.editor import Editor

REPEATS = 21
WARMUP = 2
PROTOCOL = (f"forward only (inputs encoded outside the clock), shortest of {REPEATS} runs after {WARMUP} "
            "warm-ups; edited over the mean of unedited before the edits and after their restore")


@torch.no_grad()
def forward_seconds(editor: Editor, images: Sequence, prompts: Sequence[str], repeats: int = REPEATS) -> float:
    """The shortest time of one forward of the batch (``images[i]`` with ``prompts[i]``) on
    ``editor.backbone`` as it is now, over ``repeats`` runs after ``WARMUP`` untimed ones."""
    if repeats < 1 or not images or len(images) != len(prompts):
        raise ValueError(f"forward_seconds: {len(images)} images, {len(prompts)} prompts, {repeats} repeats")
    backbone = editor.backbone  # methods that rewrite their inputs (IKE) hand out another view while edited
    inputs = backbone.encode(list(images), list(prompts))
    for _ in range(WARMUP):
        backbone.forward(inputs, use_cache=False)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        backbone.forward(inputs, use_cache=False)
        best = min(best, time.perf_counter() - start)
    return best


def latency_ratio(edited: float, before: float, after: float) -> float:
    """Edited forward time over the mean of the unedited ones measured before and after the edits."""
    return round(2 * edited / (before + after), 4)
