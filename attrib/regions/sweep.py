"""The region sweep: one entry point for every method, and the engine of the local methods.

    result = region_sweep(backbone, images, prompts, AttentionNoise(sigma=0.7, draws=10),
                          regions=lm_regions(backbone), layers=range(backbone.n_layers))

Local methods (`attrib.regions.base.LocalMethod`) work on the LM's visual tokens: one capture pass per
batch, then the method per sample and layer on the captured last-query attention. Propagated methods run
perturbed forwards from their own site (`attrib.regions.propagated`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from attrib.backbones.loader import Backbone
from attrib.regions.base import LocalMethod, PropagatedMethod, RegionMethod
from attrib.regions.capture import capture_layers, last_query_attention
from attrib.regions.noise import noise_generator
from attrib.regions.propagated import propagated_sweep
from attrib.regions.regions import RegionSet, default_radius, grid_windows, single_tokens
from attrib.regions.result import RegionResult


def lm_regions(backbone: Backbone, radius: int | None = None) -> RegionSet:
    """Windows on the LM's visual-token grid (LLaVA) or, for Q-Former backbones, one region per query."""
    if backbone.spec.grid_site == "lm":
        rows, cols = backbone.spec.grid_shape(backbone.config)
        return grid_windows(rows, cols, default_radius(rows) if radius is None else radius, "lm")
    return single_tokens(backbone.n_visual_tokens)


def vit_regions(backbone: Backbone, radius: int | None = None) -> RegionSet:
    """Windows on the vision tower's patch grid (where Q-Former backbones keep space)."""
    rows, cols = backbone.spec.grid_shape(backbone.config)
    return grid_windows(rows, cols, default_radius(rows) if radius is None else radius, "vit")


def region_sweep(backbone: Backbone, images: Sequence, prompts: Sequence[str], method: RegionMethod,
                 regions: RegionSet, layers: Sequence[int], batch_size: int = 4, progress: bool = True,
                 sample_offset: int = 0) -> RegionResult:
    """Influence maps [N, layers, C] of ``method`` for every sample, layer and region.

    Noise for sample n (global index ``sample_offset + n``) and layer ℓ comes from its own seeded stream,
    so results do not depend on the batch size.
    """
    if isinstance(method, PropagatedMethod):
        return propagated_sweep(backbone, images, prompts, method, regions, layers, batch_size, progress,
                                sample_offset)
    if not isinstance(method, LocalMethod):
        raise TypeError(f"{type(method).__name__} is not a region method (LocalMethod or PropagatedMethod)")
    return local_sweep(backbone, images, prompts, method, regions, layers, batch_size, progress, sample_offset)


def local_sweep(backbone: Backbone, images: Sequence, prompts: Sequence[str], method: LocalMethod,
                regions: RegionSet, layers: Sequence[int], batch_size: int = 4, progress: bool = True,
                sample_offset: int = 0) -> RegionResult:
    """`region_sweep` of a local method: per batch one capture pass, then ``method.local`` per sample and layer."""
    if regions.site != "lm":
        raise ValueError(f"{method.name} perturbs LM visual tokens; region set {regions.name!r} is on {regions.site!r}")
    layers = list(layers)
    maps = torch.empty(len(prompts), len(layers), regions.n_regions)
    bar = tqdm(total=len(prompts), desc=method.name, disable=not progress, mininterval=2)
    for lo in range(0, len(prompts), batch_size):
        hi = min(len(prompts), lo + batch_size)
        inputs = backbone.encode(images[lo:hi], prompts[lo:hi])
        site = backbone.visual_positions(inputs["input_ids"])  # [b, P]
        captures = capture_layers(backbone, inputs, layers)
        for row in range(hi - lo):
            index = torch.where(regions.valid, site[row][regions.members.clamp(min=0)], -1)
            for i, layer in enumerate(layers):
                attn = last_query_attention(backbone, layer, captures[layer], row)
                generator = noise_generator(getattr(method, "seed", 0), sample_offset + lo + row, layer)
                with torch.no_grad():
                    maps[lo + row, i] = method.local(attn, index, regions.valid, attn.hidden[site[row]], generator)
            bar.update(1)
    bar.close()
    return RegionResult(maps, layers, regions, method.name,
                        {"method": method.describe(), "regions": regions.name, "window": regions.window,
                         "backbone": backbone.spec.name, "model_fingerprint": backbone.fingerprint()})
