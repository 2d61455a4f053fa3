"""The causal effect's batched propagated run against perturbing one copy by hand."""
from __future__ import annotations

import torch

from attrib.regions.sweep import lm_regions, region_sweep


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
