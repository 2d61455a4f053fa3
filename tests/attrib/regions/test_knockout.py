"""Attention knockout on the tiny backbones."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from attrib.regions.knockout import AttentionKnockout
from attrib.regions.sweep import lm_regions, region_sweep


def test_knockout_is_positive_and_plots(tiny_backbone, tiny_images):
    regions = lm_regions(tiny_backbone)
    result = region_sweep(tiny_backbone, tiny_images[:1], ["what shape?"], AttentionKnockout(), regions,
                          list(range(tiny_backbone.n_layers)), progress=False)
    assert result.maps.shape == (1, tiny_backbone.n_layers, regions.n_regions)
    assert (result.maps >= -1e-6).all() and (result.maps > 0).any()
    fig = result.plot_heatmaps(sample=0)
    assert len([ax for ax in fig.axes if ax.images or ax.collections]) == tiny_backbone.n_layers
