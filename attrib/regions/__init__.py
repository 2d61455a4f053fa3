"""Region attribution: which image regions each layer relies on, by perturbing them.

One entry point (`region_sweep`) runs any method (`attrib.regions.base`) on any region set
(`RegionSet`); `REGION_METHODS` lists the methods the pipeline runs per backbone.
"""
from attrib.regions.attention_noise import AttentionNoise
from attrib.regions.base import LocalMethod, PropagatedMethod, RegionMethod
from attrib.regions.causal_noise import CausalNoise
from attrib.regions.knockout import AttentionKnockout
from attrib.regions.regions import RegionSet, grid_windows, single_tokens
from attrib.regions.registry import REGION_METHODS, MethodEntry, methods_for, sweep_plan
from attrib.regions.result import RegionResult
from attrib.regions.sweep import lm_regions, region_sweep, vit_regions
from attrib.regions.vit_noise import VitNoise

__all__ = ["AttentionKnockout", "AttentionNoise", "CausalNoise", "LocalMethod", "MethodEntry", "PropagatedMethod",
           "REGION_METHODS", "RegionMethod", "RegionResult", "RegionSet", "VitNoise", "grid_windows", "lm_regions",
           "methods_for", "region_sweep", "single_tokens", "sweep_plan", "vit_regions"]
