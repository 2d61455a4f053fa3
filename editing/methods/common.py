"""Pieces several editing methods share: the edit's teacher-forced loss, an exact weight snapshot, and a
frozen module run once per edit."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch
from PIL import Image

from attrib.backbones.loader import Backbone
from editing.inputs import TeacherForcedBatch, teacher_forced_batch


def target_loss(backbone: Backbone, images: Sequence[Image.Image] | None, prompts: Sequence[str],
                targets: Sequence[str]) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens of ``template(prompt) + " " + target`` rows
    (every target token of every row counts once), through ``backbone.forward`` so hooks apply."""
    batch = teacher_forced_batch(backbone, images, prompts, targets)
    return batch_loss(batch, backbone.forward(batch.inputs, use_cache=False).logits)


def batch_loss(batch: TeacherForcedBatch, logits: torch.Tensor) -> torch.Tensor:
    """`target_loss` of ``batch`` from its logits [B, T, V]."""
    losses = [torch.nn.functional.cross_entropy(batch.answer_logits(logits, row).float(), batch.labels(row),
                                                reduction="sum") for row in range(len(batch.target_lengths))]
    return torch.stack(losses).sum() / sum(batch.target_lengths)


def _same_call(first: tuple, now: tuple) -> bool:
    """Whether two (args, kwargs) of a module call are equal: tensors by value, anything else by ``==``."""
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and a.dtype == b.dtype and torch.equal(a, b))
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a is b or a == b

    return same(first, now)


@contextmanager
def output_reused(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``module`` computes its output once; a later call with equal arguments (tensors
    compared by value) returns that same output without running it, any other call runs it as usual.
    For a frozen module that a fine-tuning loop feeds the same input every step (the vision tower under
    FT-V): its output cannot change while nothing in it is tuned, so the reuse is exact."""
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"{type(module).__name__} has trainable parameters: its output can change")
    run = module.forward
    seen: list[tuple] = []

    def forward(*args, **kwargs):
        if seen and _same_call(seen[0][0], (args, kwargs)):
            return seen[0][1]
        out = run(*args, **kwargs)
        if not seen:
            seen.append(((args, kwargs), out))
        return out

    own = module.__dict__.get("forward")  # an instance-level forward already set, put back after
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward  # the class's forward again
        else:
            module.forward = own


class ParameterSnapshot:
    """Copies of some parameters, put back bit for bit by `restore` (the weights an editor changes)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        self.parameters = list(parameters)
        self.saved = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, saved in zip(self.parameters, self.saved, strict=True):
            parameter.copy_(saved)
