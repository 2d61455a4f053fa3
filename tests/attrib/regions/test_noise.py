"""Seeded noise streams: drawing all regions at once equals drawing them one by one."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("width, dim", [(1, 128), (9, 64), (3, 24), (2, 5)])
def test_noise_drawn_at_once_equals_region_by_region(width, dim):
    """One call for all regions (used when a region's values are a multiple of 16) draws the same noise
    as one call per region, which chunked sweeps rely on."""
    from attrib.regions.noise import draw_noise, noise_generator

    by_region = noise_generator(7, 1, 2)
    expected = torch.stack([torch.randn(3, width, dim, generator=by_region) for _ in range(5)])
    assert torch.equal(draw_noise(noise_generator(7, 1, 2), 5, 3, width, dim), expected)
