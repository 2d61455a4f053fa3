"""VisEdit's attention-input noise: the map the paper draws for each layer.

At layer ℓ, Gaussian noise is added to the region's visual tokens at the input of the attention module
(after the pre-norm); the influence is the mean over draws of 1 − cos(perturbed, clean) of that module's
output at the last prompt token. The official code uses σ = 0.7 absolute, 10 draws and the (2r+1)²
window with r = 3 around each cell of LLaVA-1.5's 24 × 24 grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attrib.regions.attention import LastQueryAttention
from attrib.regions.base import LocalMethod
from attrib.regions.noise import draw_noise, noise_scale, one_minus_cos


@dataclass(frozen=True)
class AttentionNoise(LocalMethod):
    """VisEdit's attention-input noise (official: σ = 0.7 absolute, 10 draws, r = 3 on 24 × 24)."""

    sigma: float = 0.7
    rule: str = "abs"
    draws: int = 10
    seed: int = 0
    name: str = "attention_noise"
    kind: str = "local"
    chunk: int = 64  # regions per vectorised step

    def local(self, attn: LastQueryAttention, index: torch.Tensor, valid: torch.Tensor,
              site_states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Influence [C] of each region; ``site_states`` [P, D] are the states σ="s3" refers to."""
        scale = noise_scale(self.rule, self.sigma, site_states)
        out = []
        for lo in range(0, index.shape[0], self.chunk):
            idx, ok = index[lo:lo + self.chunk], valid[lo:lo + self.chunk]
            noise = draw_noise(generator, idx.shape[0], self.draws, idx.shape[1], attn.hidden.shape[-1])
            perturbed = attn.perturbed(idx, ok, noise.to(attn.hidden.device, attn.hidden.dtype) * scale)  # [c, n, D]
            out.append(one_minus_cos(perturbed, attn.output).mean(1))
        return torch.cat(out)
