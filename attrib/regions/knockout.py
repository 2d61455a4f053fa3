"""Attention knockout: the last token may not attend to the region (Zhang et al. 2024; Neo et al. 2024).

Influence = 1 − cos(knocked-out, clean) of the layer's attention output at the last prompt token.
Deterministic: no noise, no draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attrib.regions.attention import LastQueryAttention
from attrib.regions.base import LocalMethod
from attrib.regions.noise import one_minus_cos


@dataclass(frozen=True)
class AttentionKnockout(LocalMethod):
    """Block the last token's attention to the region."""

    name: str = "attention_knockout"
    kind: str = "local"

    def local(self, attn: LastQueryAttention, index: torch.Tensor, valid: torch.Tensor,
              site_states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return one_minus_cos(attn.knocked_out(index, valid), attn.output)
