"""Baselines the region methods are scored against: captum gradients and raw attention.

- integrated_gradients: captum IG on ``pixel_values`` (zero baseline = the processor's mean image) for the
  key-token logit at the last position; |attr| summed over channels and over each patch cell.
- layer_integrated_gradients: captum LIG, per-token attribution summed over the hidden size (signed):
  on the projector output for "lm" backbones (its tokens are the LM visual tokens in grid order), on the
  ViT's last encoder layer for Q-Former backbones (their LM tokens are not spatial).
- raw_attention: the last token's head-mean attention per LM layer; LLaVA: to the visual tokens; Q-Former
  backbones: to the query tokens, composed with the head- and layer-mean Q-Former cross-attention from
  queries to ViT patches (`through_cross_attention`, which also places the per-query noise view on the
  patches).

The key token is the model's own top-1 next token, as in every region method. Unbound LLM wrappers
silently drop the image, so the captum forward keeps the text bound and varies the pixels only.
"""
from __future__ import annotations

from typing import Sequence

import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients

from attrib.backbones.loader import Backbone
from attrib.regions.capture import capture_layers, last_query_attention
from attrib.regions.regions import grid_windows
from attrib.regions.result import RegionResult


def encoded_batch(backbone: Backbone, images, prompts):
    """Encoded batch on the model's device, pixels in the model's dtype."""
    param = next(backbone.model.parameters())
    inputs = backbone.encode(images, prompts).to(param.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


def inputs_and_keys(backbone: Backbone, images, prompts):
    """`encoded_batch` and the key tokens [B] (the model's own top-1 next token)."""
    inputs = encoded_batch(backbone, images, prompts)
    with torch.no_grad():
        keys = backbone.forward(inputs).logits[:, -1].argmax(-1)
    return inputs, keys


def key_logit_forward(model: torch.nn.Module):
    """forward(pixel_values, input_ids, attention_mask) → last-position logits [B, V]: the text stays bound
    so captum varies the image only (unbound LLM wrappers silently drop the pixels)."""
    def forward(pixel_values, input_ids, attention_mask):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        return logits[:, -1].float()
    return forward


def grid_result(backbone: Backbone, maps: torch.Tensor, layers: list[int], name: str, meta: dict) -> RegionResult:
    rows, cols = backbone.spec.grid_shape(backbone.config)
    return RegionResult(maps.detach().float().cpu(), layers, grid_windows(rows, cols, 0, backbone.spec.grid_site),
                        name, {**meta, "backbone": backbone.spec.name})


def integrated_gradients_maps(backbone: Backbone, images, prompts: Sequence[str], steps: int = 16,
                              batch_size: int = 8) -> RegionResult:
    """captum IG on pixel_values → maps [N, 1, rows*cols]: |attr| summed over channels and patch cells."""
    rows, cols = backbone.spec.grid_shape(backbone.config)
    ig = IntegratedGradients(key_logit_forward(backbone.model))
    out = []
    for lo in range(0, len(prompts), batch_size):
        inputs, keys = inputs_and_keys(backbone, images[lo:lo + batch_size], prompts[lo:lo + batch_size])
        pixels = inputs["pixel_values"]  # [B, 3, S, S]
        attr = ig.attribute(pixels, baselines=torch.zeros_like(pixels), target=keys, n_steps=steps,
                            additional_forward_args=(inputs["input_ids"], inputs["attention_mask"]),
                            internal_batch_size=batch_size)
        b, _, h, w = attr.shape
        cells = attr.abs().sum(1).reshape(b, rows, h // rows, cols, w // cols).sum((2, 4))
        out.append(cells.reshape(b, 1, rows * cols))
    return grid_result(backbone, torch.cat(out), [-1], "integrated_gradients",
                        {"method": {"name": "integrated_gradients", "n_steps": steps, "baseline": "zeros",
                                    "aggregate": "|attr| summed over channels and patch cells"}})


def lig_layer(backbone: Backbone) -> tuple[str, torch.nn.Module]:
    """Where LIG attributes: the projector ("lm" grid) or the ViT's last encoder layer ("vit" grid).

    The ViT's own output is a ModelOutput and its post-LayerNorm runs twice (patches, then pooled CLS),
    both of which break captum's layer hook; the last encoder layer returns the patch tensor once, and the
    post-LayerNorm after it acts token by token, so per-patch attributions keep their meaning.
    """
    if backbone.spec.grid_site == "lm":
        return backbone.spec.bridge[-1], backbone.module(backbone.spec.bridge[-1])
    tower = backbone.module(backbone.spec.vision_tower)
    for name, module in tower.named_modules():
        if name.endswith("encoder.layers"):
            return f"{backbone.spec.vision_tower}.{name}.{len(module) - 1}", module[-1]
    raise ValueError(f"{backbone.spec.name}: no encoder.layers in the vision tower {backbone.spec.vision_tower!r}")


def layer_integrated_gradients_maps(backbone: Backbone, images, prompts: Sequence[str], steps: int = 16,
                                    batch_size: int = 8) -> RegionResult:
    """captum LIG → maps [N, 1, rows*cols]: per-token attribution (summed over the hidden size) of the
    spatial tokens at `lig_layer`, CLS dropped (the grid's tokens are the last rows*cols)."""
    rows, cols = backbone.spec.grid_shape(backbone.config)
    path, layer = lig_layer(backbone)
    lig = LayerIntegratedGradients(key_logit_forward(backbone.model), layer)
    out = []
    for lo in range(0, len(prompts), batch_size):
        inputs, keys = inputs_and_keys(backbone, images[lo:lo + batch_size], prompts[lo:lo + batch_size])
        pixels = inputs["pixel_values"]
        attr = lig.attribute(pixels, baselines=torch.zeros_like(pixels), target=keys, n_steps=steps,
                             additional_forward_args=(inputs["input_ids"], inputs["attention_mask"]),
                             internal_batch_size=batch_size)  # [B, tokens, D]
        out.append(attr.sum(-1)[:, -rows * cols:].unsqueeze(1))
    return grid_result(backbone, torch.cat(out), [-1], "layer_integrated_gradients",
                        {"method": {"name": "layer_integrated_gradients", "layer": path, "n_steps": steps,
                                    "baseline": "zeros (pixel_values)", "aggregate": "sum over hidden size"}})


@torch.no_grad()
def qformer_cross_attention(backbone: Backbone, inputs) -> torch.Tensor:
    """Q-Former cross-attention [B, queries, ViT tokens], mean over heads and cross-attention layers.

    sdpa returns no weights, so the Q-Former runs eagerly for this pass; a cross-attention call is the one
    whose kwargs carry ``encoder_hidden_states`` and whose output is (out, weights).
    """
    qformer = backbone.module(backbone.spec.bridge[0])
    previous = qformer.config._attn_implementation
    weights = []

    def keep(module, args, kwargs, output):
        if kwargs.get("encoder_hidden_states") is not None and isinstance(output, tuple) and output[1] is not None:
            weights.append(output[1].mean(1).float())  # [B, Q, S]

    hooks = [m.register_forward_hook(keep, with_kwargs=True) for m in qformer.modules()]
    try:
        qformer.set_attn_implementation("eager")
        backbone.forward(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        qformer.set_attn_implementation(previous)
    return torch.stack(weights).mean(0)


def through_cross_attention(backbone: Backbone, per_query: torch.Tensor, images, prompts: Sequence[str],
                            batch_size: int = 8) -> torch.Tensor:
    """Per-query maps [N, L, Q] of a Q-Former backbone → patch maps [N, L, rows*cols]: each query's value
    spread over the ViT patches by `qformer_cross_attention` (mean over heads and cross-attention layers); the
    CLS token's share is dropped, so a map's mass can only shrink."""
    rows, cols = backbone.spec.grid_shape(backbone.config)
    out = []
    for lo in range(0, len(prompts), batch_size):
        inputs = encoded_batch(backbone, images[lo:lo + batch_size], prompts[lo:lo + batch_size])
        cross = qformer_cross_attention(backbone, inputs)[..., -rows * cols:]  # [b, Q, patches]
        out.append(torch.einsum("blq,bqc->blc", per_query[lo:lo + batch_size].float(), cross.float().cpu()))
    return torch.cat(out)


@torch.no_grad()
def raw_attention_maps(backbone: Backbone, images, prompts: Sequence[str], batch_size: int = 8) -> RegionResult:
    """Maps [N, n_layers, rows*cols] of the last token's head-mean attention (see the module docstring).

    Attention probabilities are rebuilt from each layer's captured attention input by
    `LastQueryAttention`, so the LM keeps its fast attention kernel.
    """
    layers = list(range(backbone.n_layers))
    maps = torch.empty(len(prompts), len(layers), backbone.n_visual_tokens)
    for lo in range(0, len(prompts), batch_size):
        inputs = encoded_batch(backbone, images[lo:lo + batch_size], prompts[lo:lo + batch_size])
        site = backbone.visual_positions(inputs["input_ids"])  # [b, P]
        captures = capture_layers(backbone, inputs, layers)
        for row in range(site.shape[0]):
            for i, layer in enumerate(layers):
                attn = last_query_attention(backbone, layer, captures[layer], row)
                maps[lo + row, i] = (attn.weights / attn.denominator).mean(-1).float()[site[row]]  # [P]
    if backbone.spec.grid_site == "vit":
        maps = through_cross_attention(backbone, maps, images, prompts, batch_size)
    view = "visual tokens" if backbone.spec.grid_site == "lm" else "queries × Q-Former cross-attention to patches"
    return grid_result(backbone, maps, layers, "raw_attention",
                        {"method": {"name": "raw_attention", "view": f"last token → {view}", "heads": "mean"}})
