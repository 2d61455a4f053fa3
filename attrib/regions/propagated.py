"""The engine of propagated region methods: noise enters at a site and the perturbed forward runs on.

Per sample, per pass and per chunk of regions × draws one batched forward runs, row 0 the clean copy.
Noise on the LM's visual tokens (site "lm") enters at the input of one layer per pass, one pass per read
layer; noise on the ViT patches (site "vit") needs one pass for every read layer. What each forward keeps
and how it becomes influence is the method's (`attrib.regions.base.PropagatedMethod`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from attrib.backbones.loader import Backbone
from attrib.regions.base import PropagatedMethod
from attrib.regions.capture import capture_layers, last_query_attention
from attrib.regions.noise import draw_noise, noise_generator, noise_scale
from attrib.regions.regions import RegionSet
from attrib.regions.result import RegionResult
from attrib.trace import envoy, traced


def _repeat(inputs, copies: int) -> dict:
    return {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _noise_batch(generator, regions: RegionSet, lo: int, hi: int, draws: int, dim: int, scale: float):
    """Noise [c*draws, W, D] (zeros on padding slots) for regions lo..hi, region-major."""
    noise = draw_noise(generator, hi - lo, draws, regions.members.shape[1], dim) * scale
    noise = noise * regions.valid[lo:hi, None, :, None]
    return noise.reshape(-1, *noise.shape[2:])


@torch.no_grad()
def site_states(backbone: Backbone, inputs, site: str, layer: int) -> torch.Tensor:
    """Clean states [T_site, D] at the perturbation site of a one-row batch: the vision tower's output
    ("vit") or the input of LM layer ``layer`` ("lm")."""
    nm = traced(backbone.model)
    with nm.trace(**inputs):
        if site == "vit":
            states = envoy(nm, backbone.spec.vision_tower).output[0][0].save()
        else:
            states = envoy(nm, backbone.spec.layer_path(layer)).inputs[0][0][0].save()
    return states


def _tower_output(states: torch.Tensor):
    """A forward hook giving the vision tower's output ``states`` [rows, T, D] as its last hidden state (its
    other tensors, computed on one row, expanded to the rows)."""
    def replace(module, args, output):
        rows = states.shape[0]
        fields = {key: value.expand(rows, *value.shape[1:]) if torch.is_tensor(value) else value
                  for key, value in output.items()}
        return type(output)(**{**fields, "last_hidden_state": states})
    return replace


def perturbed_run(backbone: Backbone, inputs, site: str, layer: int, token_index: torch.Tensor,
                   noise: torch.Tensor, attention_layers: Sequence[int], attention_read: str,
                   visual: torch.Tensor | None = None, clean_site: torch.Tensor | None = None,
                   logprobs: bool = True):
    """One batch: row 0 clean, rows 1.. with ``noise`` [R, W, D] added at ``token_index`` [R, W] (-1 = none)
    at the site (for "lm": the input of ``layer``). Returns (last-position log-probs [1+R, V], or None when
    ``logprobs`` is off and the forward stops after the last read layer; per layer of ``attention_layers``
    the attention output at the last position [1+R, D] ("output") or the attention input at the LM
    positions ``visual`` [P] ([1+R, P, D], "input")).

    On the ViT site every row's tower output is the clean one plus its noise, so the tower runs on one row
    and a hook hands the rows' outputs (``clean_site`` [T, D] plus the noise) to the Q-Former: a full-size
    EVA ViT-g is most of the cost of a perturbed row otherwise."""
    nm = traced(backbone.model)
    rows = torch.arange(1, 1 + noise.shape[0])[:, None].expand_as(token_index)
    keep = token_index >= 0
    batch = _repeat(inputs, 1 + noise.shape[0])
    handle = None
    if site == "vit":
        batch["pixel_values"] = inputs["pixel_values"]
        states = clean_site.unsqueeze(0).repeat(1 + noise.shape[0], 1, 1)
        states[rows[keep], token_index[keep]] += noise[keep].to(states.device, states.dtype)
        handle = backbone.module(backbone.spec.vision_tower).register_forward_hook(_tower_output(states))
    outputs, last = {}, None
    try:
        with torch.no_grad(), nm.trace(**batch) as tracer:
            if site == "lm":
                states = envoy(nm, backbone.spec.layer_path(layer)).inputs[0][0]
                states[rows[keep], token_index[keep]] += noise[keep].to(states.device, states.dtype)
            for read_layer in sorted(attention_layers):  # execution order
                attn = envoy(nm, backbone.spec.layer_path(read_layer, "attn"))
                outputs[read_layer] = (attn.output[0][:, -1] if attention_read == "output"
                                       else attn.inputs[1]["hidden_states"][:, visual]).save()
            if logprobs:
                last = nm.output.logits[:, -1].log_softmax(-1).save()
            else:
                tracer.stop()  # nothing is read after the last read layer: the layers above need not run
    finally:
        if handle is not None:
            handle.remove()
    return last, outputs


def _site_tokens(backbone: Backbone, inputs, site: str) -> torch.Tensor:
    """Indices [P] of the site's spatial tokens in a one-row input: the LM visual positions, or the ViT
    patch tokens (after its CLS token)."""
    if site == "lm":
        return backbone.visual_positions(inputs["input_ids"])[0]
    offset = 1 if backbone.spec.vit_has_cls else 0
    return torch.arange(backbone.spec.grid_shape(backbone.config)[0] ** 2) + offset


def propagated_sweep(backbone: Backbone, images, prompts, method: PropagatedMethod, regions: RegionSet,
                     layers: Sequence[int], batch_size: int = 4, progress: bool = True,
                     sample_offset: int = 0) -> RegionResult:
    """Maps [N, read layers, C] of a propagated method (module docstring). Noise for sample n comes from
    the stream (seed, ``sample_offset`` + n, layer of the pass)."""
    site = method.site(regions)
    if regions.site != site:
        raise ValueError(f"{method.name} perturbs the {site!r} site; region set {regions.name!r} is on "
                         f"{regions.site!r}")
    if site == "vit" and backbone.spec.grid_site != "vit":
        raise ValueError(f"{backbone.spec.name}: the LM reads the vision tower through its own feature layer; "
                         "perturb its LM visual tokens (site 'lm') instead")
    read = method.read_layers(list(layers), site)
    attention_layers = [] if method.attention_read == "none" else read
    # One pass per read layer with the noise at that layer's input, or one pass for all of them.
    passes = [([i], layer) for i, layer in enumerate(read)] if site == "lm" else [(list(range(len(read))), read[0])]
    maps = torch.empty(len(prompts), len(read), regions.n_regions)
    chunk = max(1, method.max_batch // method.draws)
    bar = tqdm(total=len(prompts), desc=method.name, disable=not progress, mininterval=2)
    for n in range(len(prompts)):
        inputs = backbone.encode(images[n:n + 1], prompts[n:n + 1])
        site_tokens = _site_tokens(backbone, inputs, site)
        index_all = torch.where(regions.valid, site_tokens[regions.members.clamp(min=0)], -1)  # [C, W]
        visual, clean = None, None
        if method.attention_read == "input":
            visual = backbone.visual_positions(inputs["input_ids"])[0]
            captures = capture_layers(backbone, inputs, read)
            with torch.no_grad():  # maps must not hold an autograd graph per sample
                clean = {layer: last_query_attention(backbone, layer, captures[layer], 0) for layer in read}
        for rows, layer in passes:
            states = site_states(backbone, inputs, site, max(layer, 0))
            scale = noise_scale(method.rule, method.sigma, states[site_tokens])
            generator = noise_generator(method.seed, sample_offset + n, layer)
            for lo in range(0, regions.n_regions, chunk):
                hi = min(regions.n_regions, lo + chunk)
                noise = _noise_batch(generator, regions, lo, hi, method.draws, states.shape[-1], scale)
                token_index = index_all[lo:hi].repeat_interleave(method.draws, 0)
                logprobs, attention = perturbed_run(backbone, inputs, site, layer, token_index, noise,
                                                     attention_layers, method.attention_read, visual, states,
                                                     method.reads_logprobs)
                effect = method.effects(logprobs, attention, read, clean, visual)  # [len(rows), R]
                maps[n, rows, lo:hi] = effect.view(len(rows), hi - lo, method.draws).float().mean(-1)
        bar.update(1)
    bar.close()
    return RegionResult(maps, read, regions, method.name,
                        {"method": method.describe(), "regions": regions.name, "window": regions.window,
                         "site": site, "backbone": backbone.spec.name, "model_fingerprint": backbone.fingerprint()})
