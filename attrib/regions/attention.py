"""The attention of the last query position, recomputed from a layer's captured attention input.

Only the last prompt token's output is ever read, and a region perturbation changes only the keys and
values of the region's tokens. So instead of re-running the attention module over the whole sequence
for every (region, draw), `LastQueryAttention` keeps the clean softmax numerator and denominator of
the last query and swaps in the changed terms of the window: O(|window| · D) work per draw instead of
O(T · D) plus the projections of all T tokens.

The projections differ by LM family; `LAYOUTS` is their table (checked against the real modules'
outputs in tests/attrib/regions/test_attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionLayout:
    """Names and conventions of one attention implementation."""

    q: str
    k: str
    v: str
    o: str
    rope: bool  # rotary embeddings on q and k (from the module's position_embeddings input)
    scale_query: bool  # OPT multiplies q by `scaling` before the dot product


LAYOUTS = {
    "llama": AttentionLayout("q_proj", "k_proj", "v_proj", "o_proj", rope=True, scale_query=False),
    "opt": AttentionLayout("q_proj", "k_proj", "v_proj", "out_proj", rope=False, scale_query=True),
}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding; cos/sin broadcast over heads: x [..., H, dh], cos/sin [..., 1, dh]."""
    return x * cos + _rotate_half(x) * sin


class LastQueryAttention:
    """Clean last-query attention state of one sample at one layer, and its perturbed variants.

    hidden:  [T, D]   the attention module's input (after the pre-norm)
    mask:    [T]      additive mask of the last query row (0 or -inf; padding excluded)
    cos/sin: [T, dh]  rotary tables (None for LMs without rotary embeddings)
    """

    def __init__(self, module: torch.nn.Module, layout: AttentionLayout, hidden: torch.Tensor,
                 mask: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
        self.module, self.layout = module, layout
        self.n_heads = module.config.num_attention_heads
        self.head_dim = module.head_dim
        self.scaling = module.scaling
        self.cos, self.sin = cos, sin
        self.hidden = hidden
        t = hidden.shape[0]
        q = getattr(module, layout.q)(hidden[-1])  # [H*dh]
        if layout.scale_query:
            q = q * self.scaling
        self.q = self._rotate(q.view(self.n_heads, self.head_dim), t - 1)  # [H, dh]
        self.keys = self._heads(self._rotate(self._kv(layout.k, hidden), slice(None)))  # [T, H, dh]
        self.values = self._heads(self._kv(layout.v, hidden))  # [T, H, dh]
        scores = self._scores(self.keys) + mask[:, None]  # [T, H]
        self.max = scores.max(dim=0).values  # [H]
        self.weights = torch.exp(scores - self.max).double()  # [T, H]; float64: window terms are subtracted
        self.numerator = torch.einsum("th,thd->hd", self.weights, self.values.double())  # [H, dh]
        self.denominator = self.weights.sum(0)  # [H]
        self.output = self._project(self.numerator / self.denominator[:, None])  # [D]

    def _kv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        kv = getattr(self.module, name)(x)
        return kv.view(*x.shape[:-1], -1, self.head_dim)  # [..., Hkv, dh]

    def _delta_kv(self, name: str, noise: torch.Tensor) -> torch.Tensor:
        """Change of k/v for an additive input change: the projection's linear part only (no bias)."""
        weight = getattr(self.module, name).weight
        return (noise @ weight.T).view(*noise.shape[:-1], -1, self.head_dim)

    def _heads(self, kv: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention: repeat key/value heads up to the query heads."""
        return kv.repeat_interleave(self.n_heads // kv.shape[-2], dim=-2)

    def _rotate(self, x: torch.Tensor, positions) -> torch.Tensor:
        if not self.layout.rope:
            return x
        return _rope(x, self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2))

    def _scores(self, keys: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if self.layout.scale_query else self.scaling
        return torch.einsum("...hd,hd->...h", keys, self.q) * scale

    def _project(self, heads: torch.Tensor) -> torch.Tensor:
        """[..., H, dh] → [..., D] through the output projection."""
        flat = heads.to(self.hidden.dtype).reshape(*heads.shape[:-2], -1)
        return getattr(self.module, self.layout.o)(flat)

    def _rest(self, index: torch.Tensor, valid: torch.Tensor):
        """Numerator/denominator without the window's clean terms. index/valid [C, W] → [C, H, dh], [C, H]."""
        w = self.weights[index] * valid[..., None]  # [C, W, H]
        numerator = self.numerator - torch.einsum("cwh,cwhd->chd", w, self.values[index].double())
        return numerator, self.denominator - w.sum(1)

    def perturbed(self, index: torch.Tensor, valid: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Outputs [C, n, D] when ``noise`` [C, n, W, D] is added to the inputs at tokens ``index`` [C, W]."""
        rest_num, rest_den = self._rest(index, valid)
        noise = noise * valid[:, None, :, None]
        delta_k = self._rotate(self._delta_kv(self.layout.k, noise), index[:, None])
        keys = self.keys[index][:, None] + self._heads(delta_k)
        values = self.values[index][:, None] + self._heads(self._delta_kv(self.layout.v, noise))
        scores = self._scores(keys)  # [C, n, W, H]
        scores = scores.masked_fill(~valid[:, None, :, None], float("-inf"))
        new_max = torch.maximum(self.max, scores.amax(dim=2))  # [C, n, H]
        shift = torch.exp(self.max - new_max).double()  # rescale the clean terms to the new maximum
        w = torch.exp(scores - new_max[:, :, None]).double()  # [C, n, W, H]
        numerator = rest_num[:, None] * shift[..., None] + torch.einsum("cnwh,cnwhd->cnhd", w, values.double())
        denominator = rest_den[:, None] * shift + w.sum(2)
        return self._project(numerator / denominator[..., None])

    def knocked_out(self, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Outputs [C, D] when the last query may not attend to the tokens ``index`` [C, W]."""
        rest_num, rest_den = self._rest(index, valid)
        return self._project(rest_num / rest_den[..., None])
