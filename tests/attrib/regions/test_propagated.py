"""The propagated engine's perturbed forward against running each perturbed row on its own."""
from __future__ import annotations

import pytest
import torch

from attrib.backbones.loader import load_backbone
from attrib.regions.propagated import perturbed_run, site_states


@pytest.mark.parametrize("name", ["blip2", "minigpt4"])
def test_the_vit_site_runs_the_tower_once_and_matches_one_row_at_a_time(name, tiny_dirs, tiny_images):
    """On the ViT site the batch's tower runs on one row and a hook hands every row the clean output plus its
    noise: the log-probabilities and the read layers' attention outputs equal those of running each row
    alone with its noise added to the tower's real output."""
    backbone = load_backbone(name, tiny_dirs[name])
    inputs = backbone.encode(tiny_images[:1], ["what color is it?"])
    clean = site_states(backbone, inputs, "vit", 0)  # [T, D]
    token_index = torch.tensor([[1, 2], [5, -1], [3, 4]])  # three perturbed rows, one with a padding slot
    noise = torch.randn(3, 2, clean.shape[-1], generator=torch.Generator().manual_seed(0))
    layers = [0, backbone.n_layers - 1]
    logprobs, attention = perturbed_run(backbone, inputs, "vit", 0, token_index, noise, layers, "output",
                                         clean_site=clean)
    tower = backbone.module(backbone.spec.vision_tower)
    for row in range(4):  # row 0 is the clean copy
        def add(module, args, output, row=row):
            if row:
                keep = token_index[row - 1] >= 0
                output[0][0, token_index[row - 1][keep]] += noise[row - 1][keep]
        seen = {}
        handles = [tower.register_forward_hook(add)] + [
            backbone.module(backbone.spec.layer_path(layer, "attn")).register_forward_hook(
                lambda m, a, out, layer=layer, seen=seen: seen.__setitem__(layer, out[0][0, -1])) for layer in layers]
        try:
            with torch.no_grad():
                expected = backbone.forward(inputs).logits[0, -1].log_softmax(-1)
        finally:
            for handle in handles:
                handle.remove()
        torch.testing.assert_close(logprobs[row], expected, atol=1e-5, rtol=1e-5)
        for layer in layers:
            torch.testing.assert_close(attention[layer][row], seen[layer], atol=1e-5, rtol=1e-5)


def test_a_run_that_reads_no_logprobs_stops_after_its_last_read_layer(tiny_dirs, tiny_images):
    backbone = load_backbone("blip2", tiny_dirs["blip2"])
    inputs = backbone.encode(tiny_images[:1], ["what color is it?"])
    clean = site_states(backbone, inputs, "vit", 0)
    ran = []
    last = backbone.module(backbone.spec.layer_path(backbone.n_layers - 1))
    handle = last.register_forward_hook(lambda *args: ran.append(True))
    try:
        logprobs, attention = perturbed_run(backbone, inputs, "vit", 0, torch.tensor([[1]]),
                                             torch.ones(1, 1, clean.shape[-1]), [0], "output", clean_site=clean,
                                             logprobs=False)
    finally:
        handle.remove()
    assert logprobs is None and attention[0].shape[0] == 2 and not ran
