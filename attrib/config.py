"""The settings of an attribution run (`attrib.attribution.run_attribution`, `attrib.validation.validate`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttributionConfig:
    sigma: float = 0.7  # VisEdit's absolute σ
    rule: str = "abs"
    draws: int = 10
    seed: int = 0
    window: int | None = None  # radius in cells; None = VisEdit's r = 3 scaled to the grid
    vit_read: str = "local"  # Q-Former backbones' ViT noise: "local" (VisEdit's) or "propagated"; see VitNoise
    causal_samples: int = 8  # the causal effect runs full forwards: fewer samples
    causal_draws: int = 3
    causal_layer_stride: int = 3  # the causal effect at every k-th layer: each layer is a batch of full forwards
    batch_size: int = 8
    threshold: float = 0.5  # placement rule's τ
    ceiling_samples: int = 32  # world records for the visual patching ceiling; 0 = skip it
    ceiling_threshold: float = 0.9  # placement rule's κ
