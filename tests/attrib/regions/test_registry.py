"""The region-method registry: which methods each kind of backbone gets, in order, and the shared contract."""
from __future__ import annotations

import pytest

from attrib.backbones.loader import load_backbone
from attrib.config import AttributionConfig
from attrib.regions.base import LocalMethod, PropagatedMethod
from attrib.regions.registry import REGION_METHODS, methods_for, sweep_plan


@pytest.mark.parametrize("name, expected", [
    ("llava", ["attention_noise", "attention_knockout", "causal_noise"]),
    ("blip2", ["vit_noise", "query_noise", "causal_noise"]),
    ("minigpt4", ["vit_noise", "query_noise", "causal_noise"]),
])
def test_each_backbone_gets_its_methods_primary_first(tiny_dirs, name, expected):
    backbone = load_backbone(name, tiny_dirs[name])
    entries = methods_for(backbone)
    assert [entry.name for entry in entries] == expected
    config = AttributionConfig(window=1)
    for entry in entries:
        method = entry.method(config)
        assert isinstance(method, (LocalMethod, PropagatedMethod))
        regions = entry.regions(backbone, config)
        # Local methods work on the LM's visual tokens; the ViT noise on the patches (a grid, window 1).
        if isinstance(method, LocalMethod):
            assert regions.site == "lm"
        if entry.name == "vit_noise":
            assert regions.site == "vit" and regions.window == 1
    # The per-query view of the Q-Former backbones is one region per query token, whatever the window.
    if name != "llava":
        query = next(entry for entry in entries if entry.name == "query_noise").regions(backbone, config)
        assert query.shape == (1, backbone.n_visual_tokens) and query.window == 0


def test_costly_methods_run_on_fewer_samples_and_layers(tiny_dirs):
    backbone = load_backbone("llava", tiny_dirs["llava"])
    config = AttributionConfig(causal_samples=3, causal_layer_stride=2)
    assert sweep_plan(backbone, config, 10, costly=False) == (10, list(range(backbone.n_layers)))
    assert sweep_plan(backbone, config, 10, costly=True) == (3, list(range(backbone.n_layers))[::2])
    assert [entry.name for entry in REGION_METHODS if entry.costly] == ["causal_noise"]


def test_methods_record_their_settings():
    entry = next(entry for entry in REGION_METHODS if entry.name == "attention_noise")
    described = entry.method(AttributionConfig(sigma=0.5, draws=3, seed=7)).describe()
    assert described == {"sigma": 0.5, "rule": "abs", "draws": 3, "seed": 7, "name": "attention_noise",
                         "kind": "local", "chunk": 64}
