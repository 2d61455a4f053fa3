"""The local sweep engine against the naive official-style sweep, on the same noise; dispatch by kind."""
from __future__ import annotations

import pytest
import torch

from attrib.regions.attention_noise import AttentionNoise
from attrib.regions.naive import naive_noise_map
from attrib.regions.sweep import lm_regions, region_sweep


def test_engine_equals_naive_sweep(tiny_backbone, tiny_images):
    prompts = ["what color is the circle?", "red"]
    regions = lm_regions(tiny_backbone, radius=1)
    method = AttentionNoise(sigma=0.7, draws=3, seed=5, chunk=3)
    result = region_sweep(tiny_backbone, tiny_images, prompts, method, regions, [0, 1], progress=False)
    inputs = tiny_backbone.encode(tiny_images, prompts)
    for row in range(2):
        for i, layer in enumerate([0, 1]):
            reference = naive_noise_map(tiny_backbone, inputs, row, layer, regions, method, sample_key=row)
            assert torch.allclose(result.maps[row, i], reference, atol=1e-5)


def test_independent_of_batch_size_and_seeded(tiny_backbone, tiny_images):
    prompts = ["what color is the circle?", "red"]
    regions = lm_regions(tiny_backbone)
    method = AttentionNoise(draws=2, rule="s3", sigma=1.0)
    a = region_sweep(tiny_backbone, tiny_images, prompts, method, regions, [1], batch_size=1, progress=False)
    b = region_sweep(tiny_backbone, tiny_images, prompts, method, regions, [1], batch_size=2, progress=False)
    assert torch.allclose(a.maps, b.maps, atol=1e-6)
    c = region_sweep(tiny_backbone, tiny_images, prompts, AttentionNoise(draws=2, rule="s3", sigma=1.0, seed=1),
                     regions, [1], batch_size=2, progress=False)
    assert not torch.allclose(a.maps, c.maps)
    assert a.meta["method"]["rule"] == "s3" and a.meta["method"]["seed"] == 0


def test_a_non_method_is_refused(tiny_backbone, tiny_images):
    with pytest.raises(TypeError, match="not a region method"):
        region_sweep(tiny_backbone, tiny_images, ["a"], object(), lm_regions(tiny_backbone), [0], progress=False)
