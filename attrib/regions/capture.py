"""One traced pass that records what the local region methods need at every requested layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attrib.backbones.loader import Backbone
from attrib.regions.attention import LAYOUTS, LastQueryAttention
from attrib.trace import envoy, traced


@dataclass
class LayerCapture:
    """Attention inputs of one batch at one layer. hidden [B, T, D]; mask [B, T] (last query row)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    output: torch.Tensor  # [B, D] the module's real output at the last position
    cos: torch.Tensor | None  # [B, T, dh]
    sin: torch.Tensor | None


def _last_row_mask(mask: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
    """Additive mask [B, T] of the last query from the module's 4-D mask (or the 2-D padding mask)."""
    if mask is None:
        row = attention_mask.bool()
    else:
        row = mask[:, 0, -1]
        if row.dtype != torch.bool:
            return row.float()
    return torch.zeros(row.shape).masked_fill(~row, float("-inf"))


@torch.no_grad()
def capture_layers(backbone: Backbone, inputs, layers: list[int]) -> dict[int, LayerCapture]:
    """Run ``inputs`` once and keep each requested layer's attention input, mask and rotary tables."""
    spec = backbone.spec
    nm = traced(backbone.model)
    saved: dict[int, tuple] = {}
    with nm.trace(**inputs):
        for layer in sorted(layers):
            attn = envoy(nm, spec.layer_path(layer, "attn"))
            args, kwargs = attn.inputs
            pos = kwargs.get("position_embeddings")
            mask = kwargs.get("attention_mask")
            saved[layer] = (kwargs["hidden_states"].save(), mask.save() if isinstance(mask, torch.Tensor) else None,
                            pos[0].save() if pos is not None else None, pos[1].save() if pos is not None else None,
                            attn.output[0][:, -1].save())
    captures = {}
    for layer, (hidden, mask, cos, sin, output) in saved.items():
        captures[layer] = LayerCapture(hidden, _last_row_mask(mask, inputs["attention_mask"]), output,
                                       None if cos is None else cos.expand(hidden.shape[0], -1, -1),
                                       None if sin is None else sin.expand(hidden.shape[0], -1, -1))
    return captures


def last_query_attention(backbone: Backbone, layer: int, capture: LayerCapture, row: int) -> LastQueryAttention:
    """The clean last-query attention of batch row ``row`` at ``layer``."""
    module = backbone.module(backbone.spec.layer_path(layer, "attn"))
    layout = LAYOUTS[backbone.spec.text_model_type]
    cos = None if capture.cos is None else capture.cos[row]
    sin = None if capture.sin is None else capture.sin[row]
    return LastQueryAttention(module, layout, capture.hidden[row], capture.mask[row], cos, sin)
