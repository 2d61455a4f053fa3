"""The ViT-patch noise of the Q-Former backbones: every layer read, VisEdit's local read against a manual
run, and the two reads."""
from __future__ import annotations

import pytest
import torch

from attrib.regions.sweep import region_sweep


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
