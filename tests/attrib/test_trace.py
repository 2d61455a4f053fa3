"""nnsight tracing reproduces the plain forward and reaches every spec path."""
from __future__ import annotations

import torch

from attrib.trace import envoy, traced


def test_traced_forward_equals_plain(tiny_backbone, tiny_images):
    inputs = tiny_backbone.encode(tiny_images, ["what color is the circle?", "red"])
    spec = tiny_backbone.spec
    nm = traced(tiny_backbone.model)
    with torch.no_grad(), nm.trace(**inputs):
        attn = envoy(nm, spec.layer_path(0, "attn")).output[0].save()
        hidden = envoy(nm, spec.layer_path(tiny_backbone.n_layers - 1)).output.save()
        logits = nm.output.logits.save()
    with torch.no_grad():
        plain = tiny_backbone.model(**inputs).logits
    assert torch.equal(logits, plain)
    batch, length = inputs["input_ids"].shape
    width = tiny_backbone.config.text_config.hidden_size
    assert attn.shape == hidden.shape == (batch, length, width)
    # The final norm and head applied to the last layer's output give the logits back.
    model = tiny_backbone.model
    relogits = model.get_submodule(spec.lm_head)(model.get_submodule(spec.final_norm)(hidden))
    assert torch.allclose(relogits, plain, atol=1e-5)
