"""VisEdit's map for backbones whose LM tokens are not spatial: noise on the ViT patches, read per LM layer.

Noise goes on a region of ViT patch tokens of a Q-Former backbone; one perturbed forward serves every
requested LM layer, where the influence is 1 − cos of the last token's attention output. Two reads:

- ``read="local"`` (default) is VisEdit's: the noisy query tokens' states at layer ℓ's attention input
  enter only that attention module, as keys and values, while the last token keeps its clean state (its
  query), exactly as VisEdit's LLaVA map perturbs the visual tokens of one attention module.
- ``read="propagated"`` reads the attention output of the perturbed forward itself, whose last token has
  also taken up the noise through layers 0..ℓ-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attrib.regions.attention import LastQueryAttention
from attrib.regions.base import PropagatedMethod
from attrib.regions.noise import one_minus_cos
from attrib.regions.regions import RegionSet

VIT_READS = ("local", "propagated")


@dataclass(frozen=True)
class VitNoise(PropagatedMethod):
    sigma: float = 0.7
    rule: str = "abs"
    draws: int = 4
    seed: int = 0
    read: str = "local"  # see the module docstring
    max_batch: int = 96
    name: str = "vit_noise"
    kind: str = "propagated"
    reads_logprobs = False  # the read is at the band's attention, not at the output

    def __post_init__(self):
        if self.read not in VIT_READS:
            raise ValueError(f"VitNoise read must be one of {VIT_READS}, got {self.read!r}")

    @property
    def attention_read(self) -> str:
        return "input" if self.read == "local" else "output"

    def site(self, regions: RegionSet) -> str:
        return "vit"

    def read_layers(self, layers: list[int], site: str) -> list[int]:
        return list(layers)

    def effects(self, logprobs: torch.Tensor, attention: dict[int, torch.Tensor], read: list[int],
                clean: dict[int, LastQueryAttention] | None, visual: torch.Tensor | None) -> torch.Tensor:
        if self.read == "local":
            return torch.stack([local_effects(clean[layer], visual, attention[layer]) for layer in read])
        return torch.stack([one_minus_cos(attention[layer][1:], attention[layer][0]) for layer in read])


@torch.no_grad()
def local_effects(attn: LastQueryAttention, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """1 − cos [R] of the last query's attention output when the tokens at ``positions`` [P] enter this
    attention module with ``states[1:]`` [R, P, D] instead of the clean ``states[0]`` (the last token's
    own state, hence its query, stays clean)."""
    change = (states[1:] - states[:1])[None]
    valid = torch.ones(1, len(positions), dtype=torch.bool)
    return one_minus_cos(attn.perturbed(positions[None], valid, change)[0], attn.output)
