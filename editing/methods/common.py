"""Pieces several editing methods share: the edit's teacher-forced loss and an exact weight snapshot."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from PIL import Image

from attrib.backbones.loader import Backbone
from editing.inputs import teacher_forced_batch


def target_loss(backbone: Backbone, images: Sequence[Image.Image] | None, prompts: Sequence[str],
                targets: Sequence[str]) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens of ``template(prompt) + " " + target`` rows
    (every target token of every row counts once), through ``backbone.forward`` so hooks apply."""
    batch = teacher_forced_batch(backbone, images, prompts, targets)
    logits = backbone.forward(batch.inputs, use_cache=False).logits
    losses = [torch.nn.functional.cross_entropy(batch.answer_logits(logits, row).float(), batch.labels(row),
                                                reduction="sum") for row in range(len(prompts))]
    return torch.stack(losses).sum() / sum(batch.target_lengths)


class ParameterSnapshot:
    """Copies of some parameters, put back bit for bit by `restore` (the weights an editor changes)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        self.parameters = list(parameters)
        self.saved = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, saved in zip(self.parameters, self.saved, strict=True):
            parameter.copy_(saved)
