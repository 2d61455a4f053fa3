"""Seeded noise streams and the influence measure the region methods share."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


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
    """1 − cos of ``perturbed`` [..., D] against ``clean`` [D] (broadcast), in float32: the influence of a
    perturbation on an attention output."""
    return 1 - F.cosine_similarity(perturbed.float(), clean.float().expand_as(perturbed), dim=-1)
