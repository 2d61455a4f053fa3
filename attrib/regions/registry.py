"""The region methods the attribution pipeline runs, in order, per kind of backbone.

Each `MethodEntry` says which backbones a method applies to (by where their spatial grid lives,
``spec.grid_site``), how to build it from an `AttributionConfig`, on which regions it runs, and whether it
is costly (full forwards per region: the pipeline runs it on fewer samples and layers, `sweep_plan`). The
first entry that applies to a backbone is its primary method: the one the artifact summarises.

LLaVA ("lm": its LM visual tokens are the patch grid) gets VisEdit's attention-input noise, attention
knockout and the causal effect on that grid. Q-Former backbones ("vit": the LM sees non-spatial query
tokens) get VisEdit's noise on the ViT patches read at every LM layer, the same attention-input noise per
query token (the per-query view), and the causal effect from the ViT patches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from attrib.backbones.loader import Backbone
from attrib.config import AttributionConfig
from attrib.regions.attention_noise import AttentionNoise
from attrib.regions.base import RegionMethod
from attrib.regions.causal_noise import CausalNoise
from attrib.regions.knockout import AttentionKnockout
from attrib.regions.regions import RegionSet
from attrib.regions.sweep import lm_regions, vit_regions
from attrib.regions.vit_noise import VitNoise


@dataclass(frozen=True)
class MethodEntry:
    name: str  # the key of its results (maps in the artifact, scores in the validation)
    grid_sites: tuple[str, ...]  # the backbones it runs on, by spec.grid_site
    method: Callable[[AttributionConfig], RegionMethod]
    regions: Callable[[Backbone, AttributionConfig], RegionSet]
    costly: bool = False


def _spatial(backbone: Backbone, config: AttributionConfig) -> RegionSet:
    """Windows on the backbone's spatial grid, wherever it lives."""
    site = lm_regions if backbone.spec.grid_site == "lm" else vit_regions
    return site(backbone, config.window)


REGION_METHODS: tuple[MethodEntry, ...] = (
    MethodEntry("attention_noise", ("lm",), lambda c: AttentionNoise(c.sigma, c.rule, c.draws, c.seed),
                lambda b, c: lm_regions(b, c.window)),
    # Half the draws: one draw is a full forward of the model, not one attention call.
    MethodEntry("vit_noise", ("vit",), lambda c: VitNoise(c.sigma, c.rule, max(2, c.draws // 2), c.seed, c.vit_read),
                lambda b, c: vit_regions(b, c.window)),
    MethodEntry("attention_knockout", ("lm",), lambda c: AttentionKnockout(), lambda b, c: lm_regions(b, c.window)),
    MethodEntry("query_noise", ("vit",), lambda c: AttentionNoise(c.sigma, c.rule, c.draws, c.seed),
                lambda b, c: lm_regions(b)),
    MethodEntry("causal_noise", ("lm", "vit"), lambda c: CausalNoise(draws=c.causal_draws, seed=c.seed), _spatial,
                costly=True),
)


def methods_for(backbone: Backbone) -> list[MethodEntry]:
    """The entries that apply to ``backbone``, the primary method first."""
    return [entry for entry in REGION_METHODS if backbone.spec.grid_site in entry.grid_sites]


def sweep_plan(backbone: Backbone, config: AttributionConfig, n_records: int, costly: bool) -> tuple[int, list[int]]:
    """(samples, layers) a method runs on: all of them, or for a costly method the first
    ``config.causal_samples`` samples at every ``config.causal_layer_stride``-th layer."""
    layers = list(range(backbone.n_layers))
    if not costly:
        return n_records, layers
    return min(n_records, config.causal_samples), layers[::config.causal_layer_stride]
