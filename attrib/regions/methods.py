"""Region-influence methods: the pluggable part of the sweep.

Local methods act on one layer's last-query attention (`LastQueryAttention`) and read its output:
- `AttentionNoise`: VisEdit's noise perturbation of the attention input; influence = mean over draws of
  1 − cos(perturbed, clean) at the last prompt token.
- `AttentionKnockout`: the last token may not attend to the region (Zhang et al. 2024; Neo et al. 2024);
  influence = 1 − cos(knocked-out, clean).
Propagated methods (`CausalNoise`, `VitNoise`) run perturbed forwards; see `attrib.regions.propagated`.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attrib.regions.attention import LastQueryAttention


def noise_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator for one (seed, sample, layer, ...) stream, stable across runs and chunkings."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def draw_noise(generator: torch.Generator, n_regions: int, draws: int, width: int, dim: int) -> torch.Tensor:
    """Standard normal noise [C, draws, W, D], the stream consumed region by region (so chunked callers
    match). PyTorch's CPU normal sampler turns uniforms into normals in blocks of 16 values, so when a
    region holds a multiple of 16 values one call for all regions draws exactly what region-by-region
    calls would (pinned by a test) — one call instead of C."""
    if (draws * width * dim) % 16 == 0:
        return torch.randn(n_regions, draws, width, dim, generator=generator)
    return torch.stack([torch.randn(draws, width, dim, generator=generator) for _ in range(n_regions)])


def noise_scale(rule: str, sigma: float, states: torch.Tensor) -> float:
    """Absolute σ, or "s3": σ × std of the states being perturbed (ROME uses 3 × std)."""
    if rule == "abs":
        return sigma
    if rule == "s3":
        return sigma * states.float().std().item()
    raise ValueError(f"unknown noise rule {rule!r}; use 'abs' or 's3'")


def one_minus_cos(perturbed: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(perturbed.float(), clean.float().expand_as(perturbed), dim=-1)


@dataclass(frozen=True)
class AttentionNoise:
    """VisEdit's attention-input noise (official: σ = 0.7 absolute, 10 draws, r = 3 on 24 × 24)."""

    sigma: float = 0.7
    rule: str = "abs"
    draws: int = 10
    seed: int = 0
    name: str = "attention_noise"
    kind: str = "local"
    chunk: int = 64  # regions per vectorised step

    def describe(self) -> dict:
        return asdict(self)

    def local(self, attn: LastQueryAttention, index: torch.Tensor, valid: torch.Tensor,
              site_states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Influence [C] of each region; ``site_states`` [P, D] are the states σ="s3" refers to."""
        scale = noise_scale(self.rule, self.sigma, site_states)
        out = []
        for lo in range(0, index.shape[0], self.chunk):
            idx, ok = index[lo:lo + self.chunk], valid[lo:lo + self.chunk]
            noise = draw_noise(generator, idx.shape[0], self.draws, idx.shape[1], attn.hidden.shape[-1])
            perturbed = attn.perturbed(idx, ok, noise.to(attn.hidden.dtype) * scale)  # [c, n, D]
            out.append(one_minus_cos(perturbed, attn.output).mean(1))
        return torch.cat(out)


@dataclass(frozen=True)
class AttentionKnockout:
    """Block the last token's attention to the region; deterministic (no noise, no draws)."""

    name: str = "attention_knockout"
    kind: str = "local"

    def describe(self) -> dict:
        return asdict(self)

    def local(self, attn: LastQueryAttention, index: torch.Tensor, valid: torch.Tensor,
              site_states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return one_minus_cos(attn.knocked_out(index, valid), attn.output)
