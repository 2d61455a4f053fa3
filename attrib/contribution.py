"""Contribution allocation (the paper's §3.1): how much each layer's attention and MLP push the key token.

What it is for: bar charts of per-layer attention and MLP contributions at the last prompt token N,
the evidence the editor uses to place its adapter. When to use it: once per backbone and data set,
before placement; on any backbone whose spec is registered.

The residual stream at N decomposes exactly as ``h^L = h^0 + Σ_l (a^l + m^l)`` (pre-norm decoders).
Two readings of each term r are returned, both from one traced forward per batch:

- **VisEdit contribution** (the paper's formula): ``z = lm_head(final_norm(r))`` with the real norm applied
  to the term alone, ``v = z[o*]``, ``p = softmax(z)[o*]``, per sample ``M = max |v|`` over all
  attention and MLP terms, ``C = sign(v) · |v/M|^0.5 · p^0.5``.
- **Direct logit attribution** (exact): the final norm is linearised with the clean run's scale (RMS of
  ``h^L`` for Llama, its standard deviation for OPT, whose centring is linear and so distributes over the
  terms), so ``dla_embed + Σ dla_attn + Σ dla_mlp + dla_bias == logits[N, o*]``.

Canonical pattern::

    result = contribution(backbone, images, prompts)          # o* = the model's own top-1 token
    result.plot_bars()                                         # VisEdit bars, layer on x
    save_file(result.to_tensors(), "contrib.safetensors", metadata=result.metadata())

Gotchas: ``o*`` for a given target is the first token the tokenizer produces for the target after the
prompt (``" " + target`` on BPE tokenizers); post-norm OPT (e.g. opt-350m) and OPT with ``project_out``
are refused because the decomposition does not hold for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from attrib.backbones.loader import Backbone
from attrib.backbones.spec import BackboneSpec
from attrib.trace import envoy, traced


@dataclass
class ContributionResult:
    """Per-sample, per-layer contributions at the last prompt token. N samples, L decoder layers."""

    backbone: str
    model_fingerprint: str
    key_tokens: torch.Tensor  # [N] long: o*
    attn: torch.Tensor  # [N, L] VisEdit C of each layer's attention output
    mlp: torch.Tensor  # [N, L] VisEdit C of each layer's MLP output
    dla_attn: torch.Tensor  # [N, L] exact logit term of each attention output
    dla_mlp: torch.Tensor  # [N, L] exact logit term of each MLP output
    dla_embed: torch.Tensor  # [N] logit term of h^0 (embeddings, image merged in, OPT positions)
    dla_bias: torch.Tensor  # [N] logit term of the final norm's bias (and lm_head's); 0 for RMSNorm
    logit: torch.Tensor  # [N] the model's real logit of o* at N

    @property
    def n_layers(self) -> int:
        return self.attn.shape[1]

    def mean(self) -> dict[str, list[float]]:
        """Mean VisEdit contribution over samples: ``{"attn": [L floats], "mlp": [L floats]}``."""
        return {"attn": self.attn.mean(0).tolist(), "mlp": self.mlp.mean(0).tolist()}

    def plot_bars(self, ax=None, kind: str = "visedit"):
        """Per-layer attention and MLP bars side by side (means over samples), layer on x.

        ``kind="visedit"`` plots C, ``kind="dla"`` the exact logit terms. Returns the matplotlib Figure.
        """
        import matplotlib.pyplot as plt

        series = {"visedit": (self.attn, self.mlp, "contribution C"),
                  "dla": (self.dla_attn, self.dla_mlp, "direct logit attribution")}
        if kind not in series:
            raise ValueError(f"kind must be one of {sorted(series)}, got {kind!r}")
        attn, mlp, label = series[kind]
        if ax is None:
            _, ax = plt.subplots(figsize=(max(6.0, 0.35 * self.n_layers), 3.5))
        layers = torch.arange(self.n_layers).numpy()
        width = 0.4
        ax.bar(layers - width / 2, attn.mean(0).numpy(), width, label="attention", color="#4c72b0")
        ax.bar(layers + width / 2, mlp.mean(0).numpy(), width, label="MLP", color="#dd8452")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{self.backbone}: mean over {self.attn.shape[0]} samples")
        ax.legend(frameon=False)
        return ax.figure

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field, contiguous on the CPU (``safetensors.torch.save_file`` ready)."""
        names = ("key_tokens", "attn", "mlp", "dla_attn", "dla_mlp", "dla_embed", "dla_bias", "logit")
        return {name: getattr(self, name).detach().cpu().contiguous() for name in names}

    def metadata(self) -> dict[str, str]:
        """String metadata to store beside `to_tensors` (safetensors metadata)."""
        return {"backbone": self.backbone, "model_fingerprint": self.model_fingerprint,
                "method": "contribution", "position": "last prompt token"}


@dataclass(frozen=True)
class _LinearNorm:
    """The final norm as ``w ⊙ centre(x) / scale(x) + b``, from which DLA takes a fixed scale."""

    weight: torch.Tensor  # [D] float32
    bias: torch.Tensor | None  # [D] float32; None for RMSNorm
    eps: float
    centred: bool  # LayerNorm subtracts the mean; RMSNorm does not

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 1]: RMS (Llama) or standard deviation (OPT, biased like nn.LayerNorm) of x, with eps."""
        return (self.centre(x).pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.weight * self.centre(x) / self.scale(x)
        return out if self.bias is None else out + self.bias


def _linear_norm(module: nn.Module, text_model_type: str) -> _LinearNorm:
    """Read the final norm's parameters; refuse a module our formula does not reproduce."""
    if text_model_type == "opt":
        if not isinstance(module, nn.LayerNorm):
            raise ValueError(f"OPT final norm is {type(module).__name__}, expected nn.LayerNorm")
        weight, bias, eps, centred = module.weight, module.bias, module.eps, True
    elif text_model_type == "llama":
        weight, bias, eps, centred = module.weight, None, getattr(module, "variance_epsilon", None), False
    else:
        raise ValueError(f"no contribution decomposition for text model type {text_model_type!r}")
    if eps is None:
        raise ValueError(f"final norm {type(module).__name__} has no variance_epsilon; not a Llama RMSNorm")
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ones = torch.ones(module.normalized_shape if centred else weight.shape, device=device)
    norm = _LinearNorm((ones if weight is None else weight.detach()).float(),
                       None if bias is None else bias.detach().float(), float(eps), centred)
    # A numeric self-check catches norms that merely look alike (e.g. Gemma's 1 + w).
    probe = torch.randn(3, ones.shape[-1], generator=torch.Generator().manual_seed(0)).to(device)
    dtype = param.dtype if param is not None else torch.float32
    with torch.no_grad():
        expected = module(probe.to(dtype)).float()
    if not torch.allclose(norm(probe.to(dtype).float()), expected, rtol=1e-2, atol=1e-2):
        raise ValueError(f"final norm {type(module).__name__} is not w·centre(x)/scale(x)+b; "
                         "the exact decomposition would not hold")
    return norm


def check_decomposable(backbone: Backbone) -> _LinearNorm:
    """Refuse backbones where ``h^L = h^0 + Σ (a + m)`` and the linearised final norm do not hold.

    OPT must be pre-norm (``do_layer_norm_before``) with a final layer norm and no ``project_in`` /
    ``project_out`` (``word_embed_proj_dim == hidden_size``); the head must be a linear layer; the model
    must be in eval mode (dropout would break the residual sum). Returns the linearised final norm.
    """
    spec, text = backbone.spec, backbone.config.text_config
    if backbone.model.training:
        raise ValueError("contribution needs the model in eval mode (dropout breaks the residual sum)")
    if spec.text_model_type == "opt":
        if not text.do_layer_norm_before:
            raise ValueError("post-norm OPT (do_layer_norm_before=False, e.g. opt-350m): layer outputs are "
                             "normalised, so the residual stream does not decompose into layer terms")
        if getattr(text, "_remove_final_layer_norm", False):
            raise ValueError("OPT without a final layer norm (_remove_final_layer_norm=True) is not supported")
        if text.word_embed_proj_dim != text.hidden_size:
            raise ValueError(f"OPT with word_embed_proj_dim={text.word_embed_proj_dim} != hidden_size="
                             f"{text.hidden_size} has project_in/project_out around the decoder; not supported")
    if not isinstance(backbone.module(spec.lm_head), nn.Linear):
        raise ValueError(f"{spec.lm_head} is {type(backbone.module(spec.lm_head)).__name__}, expected nn.Linear")
    return _linear_norm(backbone.module(spec.final_norm), spec.text_model_type)


@dataclass
class _LastPosition:
    """What one traced pass saves, all at the last position N; B rows, L layers, D width, V vocab."""

    embed: torch.Tensor  # [B, D] h^0: input of layer 0
    attn: torch.Tensor  # [B, L, D] a^l
    mlp: torch.Tensor  # [B, L, D] m^l
    final: torch.Tensor  # [B, D] h^L: output of the last layer, before the final norm
    logits: torch.Tensor  # [B, V]


def _relative(path: str, root: str) -> str:
    """``path`` relative to the module at ``root`` ("" = the whole model)."""
    if not root:
        return path
    if not path.startswith(root + "."):
        raise ValueError(f"{path} is not inside {root}")
    return path[len(root) + 1:]


def trace_last_position(nm, spec: BackboneSpec, root: str, n_layers: int, inputs) -> _LastPosition:
    """One traced forward; saves only the last-position slices (cloned, so the [B, T, D] outputs are freed)."""
    batch = inputs["input_ids"].shape[0]
    attn, mlp = [], []  # containers live outside the trace (nnsight rule)
    with torch.no_grad(), nm.trace(**inputs):
        embed = envoy(nm, _relative(spec.layer_path(0), root)).input[:, -1].clone().save()
        for layer in range(n_layers):  # execution order: attention, then MLP, layer by layer
            a = envoy(nm, _relative(spec.layer_path(layer, "attn"), root)).output[0]  # [B, T, D]
            attn.append(a[:, -1].clone().save())
            m = envoy(nm, _relative(spec.layer_path(layer, "mlp"), root)).output
            if spec.mlp_output_flat:  # OPT's fc2 runs on [B*T, D]; rows are b*T + t
                m = m.view(batch, -1, m.shape[-1])
            mlp.append(m[:, -1].clone().save())
        final = envoy(nm, _relative(spec.layer_path(n_layers - 1), root)).output[:, -1].clone().save()
        logits = nm.output.logits[:, -1].clone().save()
    return _LastPosition(embed, torch.stack(attn, 1), torch.stack(mlp, 1), final, logits)


def _key_tokens(backbone: Backbone, with_image: bool, prompts: Sequence[str],
                targets: Sequence[str] | None, logits: torch.Tensor) -> torch.Tensor:
    """[B] o*: argmax of ``logits`` [B, V], or each target's first token as tokenised after its prompt."""
    if targets is None:
        return logits.argmax(-1)
    tokenizer, keys = backbone.tokenizer, []
    for prompt, target in zip(prompts, targets, strict=True):
        text = backbone.format_prompt(prompt, with_image=with_image)
        base = tokenizer(text).input_ids
        full = tokenizer(f"{text} {target}").input_ids
        # First position where prompt+target departs from the prompt (SentencePiece merges differ from BPE).
        start = next((i for i, (x, y) in enumerate(zip(base, full)) if x != y), len(base))
        if not target.strip() or start >= len(full):
            raise ValueError(f"target {target!r} adds no token after prompt {prompt!r}")
        keys.append(full[start])
    return torch.tensor(keys, device=logits.device)


def _visedit(final_norm: nn.Module, lm_head: nn.Linear, terms: torch.Tensor,
             keys: torch.Tensor) -> torch.Tensor:
    """[B, K] VisEdit C of ``terms`` [B, K, D] (the real norm and head on each term), o* = ``keys`` [B]."""
    norm_device = next(final_norm.parameters()).device
    z = lm_head(final_norm(terms.to(norm_device)).to(lm_head.weight.device)).float()  # [B, K, V]
    index = keys.to(z.device)[:, None, None].expand(-1, z.shape[1], 1)
    v = z.gather(-1, index).squeeze(-1)  # [B, K]
    p = z.log_softmax(-1).gather(-1, index).squeeze(-1).exp()  # [B, K]
    big_m = v.abs().amax(1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)  # [B, 1]
    return v.sign() * (v.abs() / big_m).sqrt() * p.sqrt()


def _dla(norm: _LinearNorm, lm_head: nn.Linear, saved: _LastPosition,
         keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact logit terms (float32): each term through ``w ⊙ centre(r) / scale(h^L)`` and the head's o* row."""
    device = norm.weight.device
    unembed = lm_head.weight.detach()[keys.to(lm_head.weight.device)].float().to(device)  # [B, D]
    scale = norm.scale(saved.final.float().to(device))  # [B, 1] the clean run's scale

    def logit_of(term: torch.Tensor) -> torch.Tensor:  # term [B, ..., D] -> [B, ...]
        term = term.float().to(device)
        extra = term.dim() - 2
        s, u = scale.view(-1, *[1] * extra, 1), unembed.view(-1, *[1] * extra, unembed.shape[-1])
        return (norm.weight * norm.centre(term) / s * u).sum(-1)

    bias = torch.zeros(keys.shape[0], device=device)
    if norm.bias is not None:
        bias = bias + unembed @ norm.bias
    if lm_head.bias is not None:
        bias = bias + lm_head.bias.detach()[keys.to(lm_head.bias.device)].float().to(device)
    return {"dla_embed": logit_of(saved.embed), "dla_attn": logit_of(saved.attn),
            "dla_mlp": logit_of(saved.mlp), "dla_bias": bias}


def _check_residual(saved: _LastPosition) -> None:
    """Refuse results where h^0 + Σ (a + m) is not h^L (an unforeseen layer structure or a hook)."""
    rebuilt = saved.embed.float() + saved.attn.float().sum(1) + saved.mlp.float().sum(1)
    final = saved.final.float()
    error = ((rebuilt - final).abs().amax() / final.abs().amax().clamp_min(1e-12)).item()
    tolerance = 1e-3 if saved.final.dtype in (torch.float32, torch.float64) else 5e-2
    if error > tolerance:
        raise RuntimeError(f"residual stream does not decompose: |h0 + Σ(a+m) − hL| / |hL| = {error:.2e}; "
                           "check the spec's attn / mlp paths and any hooks that edit layer outputs")


def contribution(backbone: Backbone, images: Sequence[Image.Image] | None, prompts: Sequence[str],
                 targets: Sequence[str] | None = None, batch_size: int = 8,
                 progress: bool = True) -> ContributionResult:
    """Contributions of every layer's attention and MLP to o* at the last prompt token.

    ``images`` (one per prompt) or None for text-only prompts (run through the spec's text LM).
    ``targets``: o* is each target's first token; default o* = the model's own top-1 next token.
    One traced forward per batch of ``batch_size`` (left-padded by ``backbone.encode``).
    """
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"{len(targets)} targets for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("no prompts")
    spec, n_layers = backbone.spec, backbone.n_layers
    norm = check_decomposable(backbone)
    final_norm, lm_head = backbone.module(spec.final_norm), backbone.module(spec.lm_head)
    # Blip2ForConditionalGeneration requires pixels, so text-only inputs run through the text LM.
    root = spec.text_lm if images is None else ""
    nm = traced(backbone.module(root) if root else backbone.model)
    device, dtype = backbone.model.device, backbone.model.dtype

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "key_tokens", "attn", "mlp", "dla_attn", "dla_mlp", "dla_embed", "dla_bias", "logit")}
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="contribution", disable=not progress or len(starts) <= 1):
        stop = start + batch_size
        batch_images = None if images is None else images[start:stop]
        batch_targets = None if targets is None else targets[start:stop]
        inputs = backbone.encode(batch_images, prompts[start:stop]).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        saved = trace_last_position(nm, spec, root, n_layers, inputs)
        _check_residual(saved)
        keys = _key_tokens(backbone, images is not None, prompts[start:stop], batch_targets, saved.logits)
        with torch.no_grad():
            visedit = _visedit(final_norm, lm_head, torch.cat([saved.attn, saved.mlp], 1), keys)
            dla = _dla(norm, lm_head, saved, keys)
        logit = saved.logits.float().gather(-1, keys.to(saved.logits.device)[:, None]).squeeze(-1)
        batch = {"key_tokens": keys, "attn": visedit[:, :n_layers], "mlp": visedit[:, n_layers:],
                 "logit": logit, **dla}
        for name, value in batch.items():
            parts[name].append(value.detach().cpu())
    return ContributionResult(backbone=spec.name, model_fingerprint=backbone.fingerprint(),
                              **{name: torch.cat(values) for name, values in parts.items()})
