"""The scene gate (our extension to VisEdit): one logit per input, how much its image is the edit's image.

The per-token IM cannot tell an unrelated scene from the edit's re-rendered image (both contain patches
that look like the edited object); the set of all visual tokens can. The gate is α·(s − β), s a
similarity of the input's and the edit image's visual-token sets, α > 0 and β learnt. Two similarities:

- ``"chamfer"``: the symmetric chamfer similarity (for each token the cosine of its best match in the
  other image, averaged, both ways);
- ``"salient"`` (default): the same on the states minus ``reference``, the mean state of each visual
  token position over the training images, each token weighted by its squared distance from that mean.
  What every image has at a position (its position code, a query's identity, plain background) drops
  out, and the tokens that differ from the usual — the objects — decide.

`editing.adapter.scenes` measures, untrained, how well each similarity separates an edit's re-rendered
image from an unrelated one on any MMEdit file (``visedit scenes``).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def chamfer_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, P, d], b [B, P', d] → [B]: mean over a's tokens of the cosine to their best match in b, and
    the same from b's side, averaged (1 for identical sets, whatever the token order)."""
    cos = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).transpose(1, 2)
    return 0.5 * (cos.amax(2).mean(1) + cos.amax(1).mean(1))


def salient_chamfer(a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """a [B, P, d], b [B, P', d], reference [P, d] (P' = P) → [B]: the chamfer similarity of a − reference
    and b − reference, each token's best-match cosine weighted by its squared norm there (module docstring)."""
    a, b = a - reference, b - reference
    cos = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).transpose(1, 2)
    wa, wb = a.pow(2).sum(-1), b.pow(2).sum(-1)
    tiny = torch.finfo(wa.dtype).tiny  # an image at the reference everywhere has nothing salient: 0, not NaN
    return 0.5 * ((cos.amax(2) * wa).sum(1) / wa.sum(1).clamp_min(tiny)
                  + (cos.amax(1) * wb).sum(1) / wb.sum(1).clamp_min(tiny))


SCENE_SIMILARITIES = ("salient", "chamfer")


class SceneGate(nn.Module):
    """One logit per input: α·(s − β), α = exp(log_scale) > 0, s the configured similarity (module
    docstring).

    Starts at α = 25 and β where, on the default backbones' LM-input states, re-rendered images and
    unrelated ones part (`editing.adapter.scenes`): chamfer 0.95–0.96 against 0.68–0.87, β = 0.9; salient
    0.87–0.92 against 0.36–0.72, β = 0.8; training sharpens the split. The salient similarity needs the
    reference states (`set_reference`, done by `editing.training.loop.train`); they are saved with the weights."""

    INIT_SCALE = 25.0
    INIT_THRESHOLD = {"chamfer": 0.9, "salient": 0.8}

    def __init__(self, similarity: str = "salient"):
        super().__init__()
        self.similarity = similarity
        self.log_scale = nn.Parameter(torch.empty(()))
        self.threshold = nn.Parameter(torch.empty(()))
        self.register_buffer("reference", torch.empty(0, 0), persistent=similarity == "salient")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_scale.fill_(math.log(self.INIT_SCALE))
            self.threshold.fill_(self.INIT_THRESHOLD[self.similarity])

    def set_reference(self, states: torch.Tensor) -> None:
        """states [P, d]: the mean visual state per token position over reference images."""
        self.reference = states.detach().to(self.threshold.device, self.threshold.dtype).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "reference"
        # the reference's shape is the backbone's, known only from the file
        if key in state_dict and self.similarity == "salient":
            self.reference = torch.empty_like(state_dict[key], device=self.threshold.device, dtype=self.threshold.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def similarity_of(self, visual: torch.Tensor, edit_visual: torch.Tensor) -> torch.Tensor:
        """visual [B, P, d], edit_visual [B, P', d] → [B] the configured similarity."""
        if self.similarity == "chamfer":
            return chamfer_similarity(visual, edit_visual)
        if not self.reference.numel():
            raise RuntimeError("the salient scene gate has no reference states: call set_reference() or load "
                               "trained weights")
        shapes = {tuple(visual.shape[1:]), tuple(edit_visual.shape[1:]), tuple(self.reference.shape)}
        if len(shapes) > 1:
            raise ValueError(f"salient scene gate: visual states {tuple(visual.shape[1:])} and edit image states "
                             f"{tuple(edit_visual.shape[1:])} do not match the reference {tuple(self.reference.shape)}")
        return salient_chamfer(visual, edit_visual, self.reference)

    def forward(self, visual: torch.Tensor, edit_visual: torch.Tensor) -> torch.Tensor:
        """visual [B, P, d], edit_visual [B, P', d] → logits [B]."""
        return self.log_scale.exp() * (self.similarity_of(visual, edit_visual) - self.threshold)
