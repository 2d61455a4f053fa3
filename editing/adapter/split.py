"""Running a backbone in two parts around the edit site: a no-grad prefix and a differentiable top.

Training only needs gradients above the edit layer (the adapter writes there; the backbone is frozen),
so a training step runs the layers below the edit site once under ``no_grad`` and only the layers
above it with autograd:

    split = SplitForward(backbone, edit_layer, hook=editor.hook)
    site = split.prefix(batch.inputs)                  # no_grad; stops right after the edit site
    logits = split.top(site, rewrite=editor.hook.apply, select=answer_positions)   # [B, K, V]

The prefix is an ordinary forward of the whole model (so the image merge, the Q-Former and OPT's
learned positions all happen exactly as in ``model(**inputs)``) that is stopped by an exception once
the edit site is reached. On its way it records the keyword arguments the decoder layers receive
(causal / padding mask, rotary tables, position ids); the top part calls the remaining decoder layers
with those, then the final norm and the LM head. With ``rewrite=None`` the result equals the model's
own logits (tested to float tolerance on every backbone family).

Edit sites: ``edit_layer = ℓ ≥ 0`` is the output of decoder layer ℓ; ``-1`` is the input of layer 0
(the LM's input embeddings after the image merge), as in `editing.adapter`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from attrib.backbones.loader import Backbone
from attrib.backbones.partial import StopForward, forward_until_stopped
from editing.adapter.hook import LM_INPUT, AdapterHook


@dataclass
class EditSite:
    """What the prefix leaves at the edit site.

    hidden:       [B, T, d]  states at the edit site (no grad)
    positions:    [B, P]     visual-token positions of every row (None for text-only inputs)
    layer_kwargs: the keyword arguments every decoder layer received (masks, rotary tables, ...)
    """

    hidden: torch.Tensor
    positions: torch.Tensor | None
    layer_kwargs: dict[str, Any]

    def visual_states(self) -> torch.Tensor:
        """[B, P, d] every row's visual-token states at the edit site."""
        rows = torch.arange(self.hidden.shape[0], device=self.hidden.device)[:, None]
        return self.hidden[rows, self.positions.to(self.hidden.device)]


class SplitForward:
    """Prefix / top split of ``backbone`` at ``edit_layer`` (see the module docstring).

    hook: the editor's `AdapterHook`, kept closed during the prefix so the recorded states are the
    unedited ones even when an edit signal is set.
    """

    def __init__(self, backbone: Backbone, edit_layer: int, hook: AdapterHook | None = None):
        if not LM_INPUT <= edit_layer < backbone.n_layers:
            raise ValueError(f"edit_layer {edit_layer} is outside -1..{backbone.n_layers - 1}")
        self.backbone, self.edit_layer, self.hook = backbone, edit_layer, hook
        self.layers = backbone.module(backbone.spec.layers)
        self.norm = backbone.module(backbone.spec.final_norm)
        self.lm_head = backbone.module(backbone.spec.lm_head)

    @torch.no_grad()
    def prefix(self, inputs) -> EditSite:
        """Run ``inputs`` up to the edit site under no_grad; the layers above are not run."""
        seen: dict[str, Any] = {}

        def first_layer(module, args, kwargs):
            seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if self.edit_layer == LM_INPUT:
                seen["hidden"] = args[0] if args else kwargs["hidden_states"]
                raise StopForward

        def edit_layer_output(module, args, output):
            seen["hidden"] = output[0] if isinstance(output, tuple) else output
            raise StopForward

        handles = [self.layers[0].register_forward_pre_hook(first_layer, with_kwargs=True)]
        if self.edit_layer != LM_INPUT:
            handles.append(self.layers[self.edit_layer].register_forward_hook(edit_layer_output))
        closed = self.hook.closed() if self.hook is not None else None
        forward_until_stopped(self.backbone, inputs, handles, closed, use_cache=False)
        if "hidden" not in seen:
            raise RuntimeError(f"the forward never reached the edit site (edit_layer {self.edit_layer})")
        positions = None
        if inputs.get("pixel_values") is not None:
            positions = self.backbone.visual_positions(inputs["input_ids"]).to(seen["hidden"].device)
        return EditSite(seen["hidden"].detach(), positions, seen["kwargs"])

    def top(self, site: EditSite, rewrite: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
            select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the edit site on: ``rewrite(hidden, positions)`` at the site, then the layers above.

        select: LongTensor [B, K] of positions whose logits are wanted (the full vocabulary at every
        position of a 7B model would be GBs); None = every position. Returns [B, K, V] (or [B, T, V]).
        Gradients flow wherever ``rewrite`` creates them.
        """
        hidden = site.hidden if rewrite is None else rewrite(site.hidden, site.positions)
        for layer in self.layers[self.edit_layer + 1:]:
            out = layer(hidden, **site.layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if select is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
            hidden = hidden[rows, select.to(hidden.device)]  # [B, K, d]
        return self.lm_head(self.norm(hidden))
