"""The straightforward region sweep, as the official VisEdit code runs it: for every region, a batch of
1 clean + `draws` noisy copies of the full attention input goes through the real attention module.

It is the reference the fast engine is tested and benchmarked against (same noise streams), not a code
path users need.
"""
from __future__ import annotations

import torch

from attrib.backbones.loader import Backbone
from attrib.backbones.partial import StopForward, forward_until_stopped
from attrib.regions.attention_noise import AttentionNoise
from attrib.regions.noise import draw_noise, noise_generator, noise_scale, one_minus_cos
from attrib.regions.regions import RegionSet


@torch.no_grad()
def attention_call(backbone: Backbone, layer: int, inputs, row: int) -> dict:
    """The keyword arguments the attention module of ``layer`` receives for batch row ``row``."""
    module = backbone.module(backbone.spec.layer_path(layer, "attn"))
    seen = {}

    def grab(_module, args, kwargs):
        seen.update(kwargs)
        raise StopForward

    forward_until_stopped(backbone, inputs, [module.register_forward_pre_hook(grab, with_kwargs=True)])
    call = {"hidden_states": seen["hidden_states"][row:row + 1]}
    mask = seen.get("attention_mask")
    call["attention_mask"] = mask[row:row + 1] if isinstance(mask, torch.Tensor) else None
    if seen.get("position_embeddings") is not None:
        cos, sin = seen["position_embeddings"]
        call["position_embeddings"] = (cos[row % cos.shape[0]][None], sin[row % sin.shape[0]][None])
    return call


def _batched_call(call: dict, hidden: torch.Tensor) -> dict:
    """The one-row attention call with ``hidden`` [n, T, D] and its mask and rotary tables expanded to n."""
    rows = hidden.shape[0]
    batch = dict(call, hidden_states=hidden)
    if call["attention_mask"] is not None:
        batch["attention_mask"] = call["attention_mask"].expand(rows, -1, -1, -1)
    if "position_embeddings" in call:
        batch["position_embeddings"] = tuple(t.expand(rows, -1, -1) for t in call["position_embeddings"])
    return batch


def _full_mask(call: dict) -> torch.Tensor:
    """Additive float mask [1, 1, T, T]: the module's own mask, or the causal one when it had none."""
    mask = call["attention_mask"]
    length = call["hidden_states"].shape[1]
    if mask is None:
        allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        return mask.clone()
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


@torch.no_grad()
def naive_attention_outputs(backbone: Backbone, layer: int, inputs, row: int, index: torch.Tensor,
                            valid: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Last-position outputs [C, n, D] of the real module with ``noise`` [C, n, W, D] added at ``index``
    [C, W] — or, with ``noise=None``, [C, 1, D] with the last query's attention to ``index`` blocked."""
    module = backbone.module(backbone.spec.layer_path(layer, "attn"))
    call = attention_call(backbone, layer, inputs, row)
    outputs = []
    for c in range(index.shape[0]):
        positions = index[c][valid[c]]
        if noise is None:
            mask = _full_mask(call)
            mask[..., -1, positions] = float("-inf")
            batch = dict(call, attention_mask=mask)
        else:
            hidden = call["hidden_states"].repeat(noise.shape[1], 1, 1)
            hidden[:, positions] += noise[c][:, valid[c]].to(hidden.dtype)
            batch = _batched_call(call, hidden)
        outputs.append(module(**batch)[0][:, -1])
    return torch.stack(outputs)


@torch.no_grad()
def naive_noise_map(backbone: Backbone, inputs, row: int, layer: int, regions: RegionSet,
                    method: AttentionNoise, sample_key: int = 0) -> torch.Tensor:
    """The official sweep for one sample and layer: per region a batch of 1 clean + draws noisy copies."""
    module = backbone.module(backbone.spec.layer_path(layer, "attn"))
    call = attention_call(backbone, layer, inputs, row)
    site = backbone.visual_positions(inputs["input_ids"])[row]
    states = call["hidden_states"][0, site]
    scale = noise_scale(method.rule, method.sigma, states)
    generator = noise_generator(method.seed, sample_key, layer)
    influence = torch.empty(regions.n_regions)
    for c in range(regions.n_regions):
        noise = draw_noise(generator, 1, method.draws, regions.members.shape[1], states.shape[-1])[0]
        members = regions.members[c][regions.valid[c]]
        hidden = call["hidden_states"].repeat(1 + method.draws, 1, 1)
        hidden[1:, site[members]] += noise[:, : len(members)].to(hidden.device, hidden.dtype) * scale
        out = module(**_batched_call(call, hidden))[0][:, -1]
        influence[c] = one_minus_cos(out[1:], out[0]).mean()
    return influence
