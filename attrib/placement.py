"""Where the editor goes, derived from the contribution curve (the paper's reading of its Figure 1).

Rule: per layer take s_ℓ = |mean C_attn,ℓ| + |mean C_mlp,ℓ| (VisEdit contributions averaged over the
data set). The high-contribution region H is every layer from the first one with s_ℓ ≥ τ · max s
(τ = 0.5) to the last layer. The influence-target (IT) layers are H; the edit layer is the one just
before H (−1 = the LM's input: the projector / Q-Former output). On LLaVA-1.5-7B the paper's curve gives
H ≈ 19–31 and edit layer 18, the official placement.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Placement:
    edit_layer: int
    it_layers: list[int]
    threshold: float
    scores: list[float]

    def to_json(self) -> dict:
        return {"edit_layer": self.edit_layer, "it_layers": self.it_layers}

    def describe(self) -> dict:
        return asdict(self)


def place_from_contribution(attn: list[float], mlp: list[float], threshold: float = 0.5) -> Placement:
    """Apply the rule above to per-layer mean contributions (lists of L floats)."""
    if len(attn) != len(mlp) or not attn:
        raise ValueError(f"need equal, non-empty attention and MLP curves (got {len(attn)} and {len(mlp)})")
    scores = [abs(a) + abs(m) for a, m in zip(attn, mlp)]
    peak = max(scores)
    first = next(i for i, s in enumerate(scores) if s >= threshold * peak)
    return Placement(first - 1, list(range(first, len(scores))), threshold, [round(s, 6) for s in scores])
