"""ROME-style causal effect of a region: noise at the input, the drop in the key token's log-probability.

Noise goes on the region's tokens at the input of LM layer ℓ (site "lm", one map per layer) or on the
ViT patches (site "vit", one map read at the output); the perturbed forward runs to the end and the
influence is the mean over draws of log p(o*) clean − log p(o*) perturbed, o* the clean top-1 token.
σ is absolute or ROME's "s3" (σ × the std of the states perturbed; ROME uses 3 × std).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attrib.regions.attention import LastQueryAttention
from attrib.regions.base import PropagatedMethod


@dataclass(frozen=True)
class CausalNoise(PropagatedMethod):
    sigma: float = 3.0
    rule: str = "s3"
    draws: int = 3
    seed: int = 0
    max_batch: int = 96
    name: str = "causal_noise"
    kind: str = "propagated"

    def read_layers(self, layers: list[int], site: str) -> list[int]:
        return [-1] if site == "vit" else list(layers)

    def effects(self, logprobs: torch.Tensor, attention: dict[int, torch.Tensor], read: list[int],
                clean: dict[int, LastQueryAttention] | None, visual: torch.Tensor | None) -> torch.Tensor:
        key = logprobs[0].argmax()
        return (logprobs[0, key] - logprobs[1:, key])[None]
