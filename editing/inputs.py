"""Teacher-forced rows ``template(prompt) + " " + target`` and where their target tokens are.

Used for the edit sample (its last prompt token feeds the IM) and for every metric. The number of
target tokens is measured as len(tokens(prompt + " " + target)) − len(tokens(prompt)), not as
len(tokens(" " + target)): SentencePiece tokenizers (Llama's, used by LLaVA and Vicuna) can encode a
lone " red" with an extra "▁" piece, which would shift every scored position by one. Rows come from
`Backbone.encode` (left-padded; BLIP-2's processor puts its padding between the query tokens and the
text), so the target is always the last ``n`` tokens of its row and padding is read from the mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from transformers import BatchFeature

from attrib.answers import target_token_ids
from attrib.backbones.loader import Backbone


@dataclass
class TeacherForcedBatch:
    """inputs: model inputs [B, T] (left-padded); target_lengths: n_b target tokens per row."""

    inputs: BatchFeature
    target_lengths: list[int]

    @property
    def prompt_ends(self) -> torch.Tensor:
        """LongTensor [B]: index of each row's last prompt token (T − n_b − 1)."""
        length = self.inputs["input_ids"].shape[1]
        return torch.tensor([length - n - 1 for n in self.target_lengths])

    def labels(self, row: int) -> torch.Tensor:
        """LongTensor [n]: the target token ids of ``row``."""
        return self.inputs["input_ids"][row, -self.target_lengths[row]:]

    def answer_logits(self, logits: torch.Tensor, row: int) -> torch.Tensor:
        """[n, V]: the logits that predict ``row``'s target tokens (one position before each)."""
        n = self.target_lengths[row]
        return logits[row, -n - 1:-1]

    def sequence_logits(self, logits: torch.Tensor, row: int) -> torch.Tensor:
        """[T_b, V]: the logits of ``row``'s real (non-padding) positions."""
        return logits[row][self.inputs["attention_mask"][row].bool()]


def target_lengths(backbone: Backbone, prompts: Sequence[str], targets: Sequence[str],
                   with_image: bool) -> list[int]:
    """Target tokens per row of ``template(prompt) + " " + target`` (see the module docstring)."""
    return [len(target_token_ids(backbone, prompt, target, with_image))
            for prompt, target in zip(prompts, targets, strict=True)]


def teacher_forced_batch(backbone: Backbone, images: Sequence[Image.Image] | None, prompts: Sequence[str],
                         targets: Sequence[str]) -> TeacherForcedBatch:
    """Encode ``prompts`` with ``targets`` appended (images optional) and locate the targets."""
    inputs = backbone.encode(images, prompts, targets)
    return TeacherForcedBatch(inputs, target_lengths(backbone, prompts, targets, images is not None))
