"""Propagated region methods: noise enters at a site and the perturbed forward runs to where it is read.

- `CausalNoise` (ROME-style causal effect): noise on the region's tokens at the input of LM layer ℓ
  (site "lm", one map per layer) or on the ViT patches (site "vit", one map read at the output);
  influence = drop in the key token's log-probability, mean over draws.
- `VitNoise`: noise on the ViT patches of a Q-Former backbone, read at every requested LM layer as
  1 − cos of the last token's attention output — VisEdit's map for backbones whose LM tokens are not
  spatial. One perturbed forward serves all layers. Two reads:
  ``read="local"`` (default) is VisEdit's: the noisy query tokens' states at layer ℓ's attention input
  enter only that attention module, as keys and values, while the last token keeps its clean state (its
  query), exactly as VisEdit's LLaVA map perturbs the visual tokens of one attention module.
  ``read="propagated"`` reads the attention output of the perturbed forward itself, whose last token has
  also taken up the noise through layers 0..ℓ-1.
Each chunk of regions × draws runs as one batch, with row 0 the clean copy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from attrib.backbones.loader import Backbone
from attrib.regions.attention import LastQueryAttention
from attrib.regions.capture import capture_layers, last_query_attention
from attrib.regions.methods import draw_noise, noise_generator, noise_scale, one_minus_cos
from attrib.regions.regions import RegionSet
from attrib.regions.result import RegionResult
from attrib.trace import envoy, traced


@dataclass(frozen=True)
class CausalNoise:
    sigma: float = 3.0
    rule: str = "s3"
    draws: int = 3
    seed: int = 0
    max_batch: int = 96
    name: str = "causal_noise"
    kind: str = "propagated"

    def describe(self) -> dict:
        return asdict(self)


VIT_READS = ("local", "propagated")


@dataclass(frozen=True)
class VitNoise:
    sigma: float = 0.7
    rule: str = "abs"
    draws: int = 4
    seed: int = 0
    read: str = "local"  # see the module docstring
    max_batch: int = 96
    name: str = "vit_noise"
    kind: str = "propagated"

    def __post_init__(self):
        if self.read not in VIT_READS:
            raise ValueError(f"VitNoise read must be one of {VIT_READS}, got {self.read!r}")

    def describe(self) -> dict:
        return asdict(self)


def _repeat(inputs, copies: int) -> dict:
    return {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _noise_batch(generator, regions: RegionSet, lo: int, hi: int, draws: int, dim: int, scale: float):
    """Noise [c*draws, W, D] (zeros on padding slots) for regions lo..hi, region-major."""
    noise = draw_noise(generator, hi - lo, draws, regions.members.shape[1], dim) * scale
    noise = noise * regions.valid[lo:hi, None, :, None]
    return noise.reshape(-1, *noise.shape[2:])


@torch.no_grad()
def _site_states(backbone: Backbone, inputs, site: str, layer: int) -> torch.Tensor:
    """Clean states [T_site, D] at the perturbation site of a one-row batch."""
    nm = traced(backbone.model)
    with nm.trace(**inputs):
        if site == "vit":
            states = envoy(nm, backbone.spec.vision_tower).output[0][0].save()
        else:
            states = envoy(nm, backbone.spec.layer_path(layer)).inputs[0][0][0].save()
    return states


def _perturbed_run(backbone: Backbone, inputs, site: str, layer: int, token_index: torch.Tensor,
                   noise: torch.Tensor, read_layers: Sequence[int], visual: torch.Tensor | None = None):
    """One batch: row 0 clean, rows 1.. with ``noise`` [R, W, D] added at ``token_index`` [R, W]
    (-1 = none). Returns (last-position log-probs [1+R, V], per read layer either the attention output at
    the last position [1+R, D] or, given LM positions ``visual`` [P], the attention input there [1+R, P, D])."""
    nm = traced(backbone.model)
    rows = torch.arange(1, 1 + noise.shape[0])[:, None].expand_as(token_index)
    keep = token_index >= 0
    batch = _repeat(inputs, 1 + noise.shape[0])
    outputs = {}
    with torch.no_grad(), nm.trace(**batch):
        if site == "vit":
            states = envoy(nm, backbone.spec.vision_tower).output[0]
            states[rows[keep], token_index[keep]] += noise[keep]
        for layer in sorted(read_layers):
            if site == "lm" and layer == read_layers[0]:
                states = envoy(nm, backbone.spec.layer_path(layer)).inputs[0][0]
                states[rows[keep], token_index[keep]] += noise[keep]
            if site == "vit":
                attn = envoy(nm, backbone.spec.layer_path(layer, "attn"))
                outputs[layer] = (attn.output[0][:, -1] if visual is None
                                  else attn.inputs[1]["hidden_states"][:, visual]).save()
        logprobs = nm.output.logits[:, -1].log_softmax(-1).save()
    return logprobs, outputs


@torch.no_grad()
def local_effects(attn: LastQueryAttention, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """1 − cos [R] of the last query's attention output when the tokens at ``positions`` [P] enter this
    attention module with ``states[1:]`` [R, P, D] instead of the clean ``states[0]`` (the last token's
    own state, hence its query, stays clean)."""
    change = (states[1:] - states[:1])[None]
    valid = torch.ones(1, len(positions), dtype=torch.bool)
    return one_minus_cos(attn.perturbed(positions[None], valid, change)[0], attn.output)


def propagated_sweep(backbone: Backbone, images, prompts, method, regions: RegionSet, layers: Sequence[int],
                     batch_size: int = 4, progress: bool = True, sample_offset: int = 0) -> RegionResult:
    """Maps [N, layers, C] of a propagated method (see the module docstring)."""
    site = "vit" if isinstance(method, VitNoise) else regions.site
    if regions.site != site:
        raise ValueError(f"{method.name} perturbs the {site!r} site; region set {regions.name!r} is on {regions.site!r}")
    if site == "vit" and backbone.spec.grid_site != "vit":
        raise ValueError(f"{backbone.spec.name}: the LM reads the vision tower through its own feature layer; "
                         "perturb its LM visual tokens (site 'lm') instead")
    read = list(layers) if isinstance(method, VitNoise) else ([-1] if site == "vit" else list(layers))
    maps = torch.empty(len(prompts), len(read), regions.n_regions)
    chunk = max(1, method.max_batch // method.draws)
    local = isinstance(method, VitNoise) and method.read == "local"
    bar = tqdm(total=len(prompts), desc=method.name, disable=not progress, mininterval=2)
    for n in range(len(prompts)):
        inputs = backbone.encode(images[n:n + 1], prompts[n:n + 1])
        offset = 1 if (site == "vit" and backbone.spec.vit_has_cls) else 0
        site_tokens = (backbone.visual_positions(inputs["input_ids"])[0] if site == "lm"
                       else torch.arange(backbone.spec.grid_shape(backbone.config)[0] ** 2) + offset)
        index_all = torch.where(regions.valid, site_tokens[regions.members.clamp(min=0)], -1)  # [C, W]
        passes = [(i, layer) for i, layer in enumerate(read)] if (site == "lm") else [(None, read[0])]
        if local:
            visual = backbone.visual_positions(inputs["input_ids"])[0]
            captures = capture_layers(backbone, inputs, read)
            with torch.no_grad():  # maps must not hold an autograd graph per sample
                clean = {layer: last_query_attention(backbone, layer, captures[layer], 0) for layer in read}
        for i, layer in passes:
            states = _site_states(backbone, inputs, site, max(layer, 0))
            scale = noise_scale(method.rule, method.sigma, states[site_tokens])
            generator = noise_generator(method.seed, sample_offset + n, layer)
            for lo in range(0, regions.n_regions, chunk):
                hi = min(regions.n_regions, lo + chunk)
                noise = _noise_batch(generator, regions, lo, hi, method.draws, states.shape[-1], scale)
                token_index = index_all[lo:hi].repeat_interleave(method.draws, 0)
                logprobs, attn = _perturbed_run(backbone, inputs, site, layer, token_index, noise,
                                                [layer] if site == "lm" else list(layers),
                                                visual if local else None)
                if isinstance(method, VitNoise):
                    for j, read_layer in enumerate(read):
                        effect = (local_effects(clean[read_layer], visual, attn[read_layer]) if local
                                  else one_minus_cos(attn[read_layer][1:], attn[read_layer][0]))
                        maps[n, j, lo:hi] = effect.view(hi - lo, method.draws).mean(1)
                else:
                    key = logprobs[0].argmax()
                    drop = logprobs[0, key] - logprobs[1:, key]
                    maps[n, i if i is not None else 0, lo:hi] = drop.view(hi - lo, method.draws).mean(1)
        bar.update(1)
    bar.close()
    return RegionResult(maps, read, regions, method.name,
                        {"method": method.describe(), "regions": regions.name, "window": regions.window,
                         "site": site, "backbone": backbone.spec.name, "model_fingerprint": backbone.fingerprint()})
