"""The sweep engine against the naive official-style sweep, on the same noise."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import pytest
import torch

from attrib.regions.attention_noise import AttentionNoise
from attrib.regions.knockout import AttentionKnockout
from attrib.regions.naive import naive_noise_map
from attrib.regions.regions import grid_windows
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


def test_knockout_is_positive_and_plots(tiny_backbone, tiny_images):
    regions = lm_regions(tiny_backbone)
    result = region_sweep(tiny_backbone, tiny_images[:1], ["what shape?"], AttentionKnockout(), regions,
                          list(range(tiny_backbone.n_layers)), progress=False)
    assert result.maps.shape == (1, tiny_backbone.n_layers, regions.n_regions)
    assert (result.maps >= -1e-6).all() and (result.maps > 0).any()
    fig = result.plot_heatmaps(sample=0)
    assert len([ax for ax in fig.axes if ax.images or ax.collections]) == tiny_backbone.n_layers


def test_grid_windows_clip_at_borders():
    regions = grid_windows(4, 4, 1, "lm")
    assert regions.valid[0].sum() == 4 and regions.valid[5].sum() == 9
    assert sorted(regions.members[0][regions.valid[0]].tolist()) == [0, 1, 4, 5]


def test_causal_noise_matches_manual_run(tiny_backbone, tiny_images):
    """The batched propagated run equals perturbing one copy by hand with the same noise."""
    from attrib.regions.causal_noise import CausalNoise
    from attrib.regions.noise import draw_noise, noise_generator, noise_scale
    from attrib.regions.propagated import site_states

    regions = lm_regions(tiny_backbone, radius=1)
    method = CausalNoise(draws=2, max_batch=4, seed=3)
    result = region_sweep(tiny_backbone, tiny_images[:1], ["what color?"], method, regions, [1], progress=False)
    inputs = tiny_backbone.encode(tiny_images[:1], ["what color?"])
    site = tiny_backbone.visual_positions(inputs["input_ids"])[0]
    states = site_states(tiny_backbone, inputs, "lm", 1)
    scale = noise_scale("s3", method.sigma, states[site])
    noise = draw_noise(noise_generator(3, 0, 1), regions.n_regions, 2, regions.members.shape[1], states.shape[-1])
    layer = tiny_backbone.module(tiny_backbone.spec.layer_path(1))
    with torch.no_grad():
        clean = tiny_backbone.forward(inputs).logits[0, -1].log_softmax(-1)
        key = clean.argmax()
        for c in (0, regions.n_regions - 1):
            members = site[regions.members[c][regions.valid[c]]]
            drops = []
            for d in range(2):
                def add(_m, args, kwargs, d=d, c=c, members=members):
                    hidden = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
                    hidden[0, members] += noise[c, d, : len(members)] * scale
                    if "hidden_states" in kwargs:
                        return args, dict(kwargs, hidden_states=hidden)
                    return (hidden, *args[1:]), kwargs
                handle = layer.register_forward_pre_hook(add, with_kwargs=True)
                try:
                    logp = tiny_backbone.forward(inputs).logits[0, -1].log_softmax(-1)
                finally:
                    handle.remove()
                drops.append(clean[key] - logp[key])
            assert torch.allclose(result.maps[0, 0, c], torch.stack(drops).mean(), atol=1e-5)


def test_vit_noise_reads_every_layer(tiny_dirs, tiny_images):
    from attrib.backbones.loader import load_backbone
    from attrib.regions.sweep import vit_regions
    from attrib.regions.vit_noise import VitNoise

    backbone = load_backbone("blip2", tiny_dirs["blip2"])
    layers = list(range(backbone.n_layers))
    result = region_sweep(backbone, tiny_images, ["what color?", "red"], VitNoise(draws=2), vit_regions(backbone),
                          layers, progress=False)
    assert result.maps.shape == (2, len(layers), 16) and (result.maps > 0).all()
    llava = load_backbone("llava", tiny_dirs["llava"])
    with pytest.raises(ValueError, match="site 'lm'"):
        region_sweep(llava, tiny_images, ["a"], VitNoise(), vit_regions(llava), [0], progress=False)


@pytest.mark.parametrize("name", ["blip2", "minigpt4"])
def test_vit_noise_local_read_matches_manual_run(name, tiny_dirs, tiny_images):
    """VisEdit's read on a Q-Former backbone: run the model with the noisy ViT patches, take the query
    tokens' states at layer ℓ's attention input, put them into a clean run's layer-ℓ attention only, and
    compare its last-position output with the clean one — the sweep's shortcut gives the same 1 − cos."""
    from attrib.backbones.loader import load_backbone
    from attrib.regions.noise import draw_noise, noise_generator
    from attrib.regions.sweep import vit_regions
    from attrib.regions.vit_noise import VitNoise

    backbone = load_backbone(name, tiny_dirs[name])
    regions, layers, draws = vit_regions(backbone, radius=0), [0, backbone.n_layers - 1], 2
    method = VitNoise(sigma=0.5, draws=draws, seed=4, max_batch=1000)
    result = region_sweep(backbone, tiny_images[:1], ["what color?"], method, regions, layers, progress=False)
    inputs = backbone.encode(tiny_images[:1], ["what color?"])
    visual = backbone.visual_positions(inputs["input_ids"])[0]
    tower = backbone.module(backbone.spec.vision_tower)
    patches = regions.members[:, 0] + (1 if backbone.spec.vit_has_cls else 0)
    noise = draw_noise(noise_generator(4, 0, layers[0]), regions.n_regions, draws, 1, tower.config.hidden_size) * 0.5

    def run(hooks):
        handles = [module.register_forward_hook(hook, with_kwargs=True) if kind == "post" else
                   module.register_forward_pre_hook(hook, with_kwargs=True) for module, kind, hook in hooks]
        try:
            backbone.forward(inputs)
        finally:
            for handle in handles:
                handle.remove()

    with torch.no_grad():
        for i, layer in enumerate(layers):
            attn = backbone.module(backbone.spec.layer_path(layer, "attn"))
            seen = {}

            def keep(key, attn=attn, seen=seen):  # the attention's input states and its last-position output
                def hook(m, a, k, out):
                    seen[key] = (k["hidden_states"][0].clone(), out[0][0, -1].clone())
                return attn, "post", hook
            run([keep("clean")])
            clean_states, clean_out = seen["clean"]
            for c in (0, regions.n_regions - 1):
                effects = []
                for d in range(draws):
                    def add(m, a, k, out, c=c, d=d):
                        out[0][0, patches[c]] += noise[c, d, 0]
                    run([(tower, "post", add), keep("noisy")])
                    noisy_states = seen["noisy"][0]

                    def swap(m, a, k, noisy_states=noisy_states):
                        hidden = k["hidden_states"].clone()
                        hidden[0, visual] = noisy_states[visual]
                        return a, dict(k, hidden_states=hidden)
                    run([(attn, "pre", swap), keep("swapped")])
                    assert torch.equal(seen["swapped"][0][-1], clean_states[-1])  # the last token stays clean
                    effects.append(1 - torch.cosine_similarity(seen["swapped"][1], clean_out, dim=0))
                assert torch.allclose(result.maps[0, i, c], torch.stack(effects).mean(), atol=1e-5), (layer, c)


def test_vit_noise_reads_differ_and_are_validated(tiny_dirs, tiny_images):
    from attrib.backbones.loader import load_backbone
    from attrib.regions.sweep import vit_regions
    from attrib.regions.vit_noise import VitNoise

    backbone = load_backbone("minigpt4", tiny_dirs["minigpt4"])
    layers = [backbone.n_layers - 1]
    maps = {read: region_sweep(backbone, tiny_images[:1], ["what color?"], VitNoise(draws=2, read=read),
                               vit_regions(backbone), layers, progress=False) for read in ("local", "propagated")}
    assert maps["local"].meta["method"]["read"] == "local"
    assert not maps["local"].maps.requires_grad  # no autograd graph kept per sample (it held GBs on 96 samples)
    assert not torch.allclose(maps["local"].maps, maps["propagated"].maps)
    with pytest.raises(ValueError, match="read must be one of"):
        VitNoise(read="output")
    from attrib.config import AttributionConfig
    from attrib.regions.registry import methods_for
    primary = methods_for(backbone)[0]
    assert primary.method(AttributionConfig()).read == "local"
    assert primary.method(AttributionConfig(vit_read="propagated")).read == "propagated"


@pytest.mark.parametrize("width, dim", [(1, 128), (9, 64), (3, 24), (2, 5)])
def test_noise_drawn_at_once_equals_region_by_region(width, dim):
    """One call for all regions (used when a region's values are a multiple of 16) draws the same noise
    as one call per region, which chunked sweeps rely on."""
    from attrib.regions.noise import draw_noise, noise_generator

    by_region = noise_generator(7, 1, 2)
    expected = torch.stack([torch.randn(3, width, dim, generator=by_region) for _ in range(5)])
    assert torch.equal(draw_noise(noise_generator(7, 1, 2), 5, 3, width, dim), expected)
