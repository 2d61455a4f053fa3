"""Where the editor goes, from the contribution curve and (when measured) the visual patching ceiling.

Contribution rule (the paper's reading of its Figure 1): per layer take s_ℓ = |mean C_attn,ℓ| +
|mean C_mlp,ℓ| (VisEdit contributions averaged over the data set). The high-contribution region H is
every layer from the first one with s_ℓ ≥ τ · max s (τ = 0.5) to the last layer. The influence-target
(IT) layers are H; the contribution edit layer e_C is the one just before H (−1 = the LM's input: the
projector / Q-Former output). On LLaVA-1.5-7B the paper's curve gives H ≈ 19–31 and edit layer 18,
the official placement.

Both curves (`place_edit`, with the ceiling c of `attrib.ceiling`: c[0] at the LM input, c[i] after
layer i − 1): the adapter must sit before the layers that read the image (e_C) *and* where rewriting
visual states can still change the answer. The ceiling's reach e_R is the deepest layer ℓ such that
every site up to and including "after ℓ" keeps c ≥ κ · c[0] (κ = 0.9; relative to c[0] because no
patch can flip more answers than the model gets right on the counterfactual images themselves; −1 when
already the output of layer 0 falls below). Then

    edit_layer    = min(e_C, e_R)
    im_read_layer = the first layer ℓ ≥ max(edit_layer, 0) with c[ℓ + 1] ≤ ρ · c[0] (ρ = 0.25; L − 1 if none)
    it_layers     = H (unchanged)

im_read_layer is where the IM reads the edit sample's last prompt token: the first layer by whose
output that token has taken in the asked-about object (patching the visual states after it flips at
most a quarter of what patching at the input does). Reading it at an early edit layer (the LM input,
say) would give the IM a bare word embedding with nothing to match on; reading it where this rule puts
it gave BLIP-2's adapter its best M-Loc of three read layers tried (docs/experiments/placement.md).
When c[0] < ``min_ceiling`` (0.5) the model does not read the counterfactual images well enough for
the curve to mean anything: the contribution rule is kept and ``note`` says so. In 6- and 12-layer
models of the world the ceiling falls at layers 2–3 whatever the depth, so e_R (−1..1) decides there;
on 7B models the ceiling is expected to stay high up to the contribution region, so e_C decides.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Placement:
    edit_layer: int
    it_layers: list[int]
    threshold: float
    scores: list[float]
    ceiling: list[float] | None = None  # [L + 1] visual patching ceiling, index 0 = LM input
    ceiling_threshold: float | None = None  # κ
    read_threshold: float | None = None  # ρ
    contribution_edit_layer: int | None = None  # e_C
    im_read_layer: int | None = None
    note: str = ""

    def to_json(self) -> dict:
        out = {"edit_layer": self.edit_layer, "it_layers": self.it_layers}
        if self.im_read_layer is not None:
            out["im_read_layer"] = self.im_read_layer
        if self.ceiling is not None:
            out["ceiling"] = [round(v, 4) for v in self.ceiling]
        return out

    def describe(self) -> dict:
        return asdict(self)


def place_from_contribution(attn: list[float], mlp: list[float], threshold: float = 0.5) -> Placement:
    """Apply the contribution rule above to per-layer mean contributions (lists of L floats)."""
    if len(attn) != len(mlp) or not attn:
        raise ValueError(f"need equal, non-empty attention and MLP curves (got {len(attn)} and {len(mlp)})")
    scores = [abs(a) + abs(m) for a, m in zip(attn, mlp)]
    peak = max(scores)
    first = next(i for i, s in enumerate(scores) if s >= threshold * peak)
    return Placement(first - 1, list(range(first, len(scores))), threshold, [round(s, 6) for s in scores])


def ceiling_reach(ceiling: list[float], threshold: float = 0.9) -> int:
    """e_R: the deepest layer whose output (and every site before it) keeps the ceiling ≥ κ · c[0]."""
    bar = threshold * ceiling[0]
    reach = -1
    for site in range(1, len(ceiling)):
        if ceiling[site] < bar:
            break
        reach = site - 1
    return reach


def place_edit(attn: list[float], mlp: list[float], threshold: float = 0.5, ceiling: list[float] | None = None,
               ceiling_threshold: float = 0.9, min_ceiling: float = 0.5, read_threshold: float = 0.25) -> Placement:
    """The placement from both curves (module docstring); the contribution rule alone without a ceiling."""
    base = place_from_contribution(attn, mlp, threshold)
    n_layers = len(attn)
    if ceiling is None:
        return replace(base, contribution_edit_layer=base.edit_layer, im_read_layer=max(base.edit_layer, 0))
    if len(ceiling) != n_layers + 1:
        raise ValueError(f"the ceiling has {len(ceiling)} values; expected {n_layers + 1} "
                         f"(LM input + {n_layers} layers)")
    kept = replace(base, ceiling=list(ceiling), ceiling_threshold=ceiling_threshold,
                   contribution_edit_layer=base.edit_layer)
    if ceiling[0] < min_ceiling:
        return replace(kept, im_read_layer=max(base.edit_layer, 0),
                       note=f"ceiling at the LM input {ceiling[0]:.2f} < {min_ceiling}: contribution rule kept")
    reach = ceiling_reach(ceiling, ceiling_threshold)
    edit_layer = min(base.edit_layer, reach)
    first = max(edit_layer, 0)
    read = next((layer for layer in range(first, n_layers) if ceiling[layer + 1] <= read_threshold * ceiling[0]),
                n_layers - 1)
    return replace(kept, edit_layer=edit_layer, im_read_layer=read, read_threshold=read_threshold)
