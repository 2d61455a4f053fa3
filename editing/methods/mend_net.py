"""MEND's parts that know nothing of records: the rank-1 gradient factors of an edit, the editor network
that transforms them, and a low-rank weight update applied to the forward without touching the weights.

Shapes: B rows, T positions, F the edited linear's input width (the MLP's hidden width), D its output width
(the model width), L edited layers. A linear ``y = W u + b`` with W [D, F] has, for a loss over the rows,
``∂loss/∂W = Σ_{b,t} δ_{b,t} u_{b,t}ᵀ`` with δ = ∂loss/∂y: the weight gradient is a sum of rank-1 terms, one
per token, and MEND edits by transforming each token's pair (u, δ) instead of the [D, F] gradient.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch import nn

from attrib.backbones.loader import Backbone
from attrib.parallel import gather
from editing.inputs import teacher_forced_batch


@dataclass
class LayerFactors:
    """The gradient factors of one edited linear: inputs [B, T, F], output gradients [B, T, D] and which
    tokens carry a rank-1 term, mask [B, T] (real positions whose u and δ are both non-zero)."""

    inputs: torch.Tensor
    grads: torch.Tensor
    mask: torch.Tensor

    def gradient(self) -> torch.Tensor:
        """[D, F]: Σ over kept tokens of δ uᵀ — the loss's gradient w.r.t. the weight."""
        keep = self.mask.unsqueeze(-1).to(self.grads.dtype)
        return torch.einsum("btd,btf->df", self.grads * keep, self.inputs)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad inside (so only what the edited layers feed gets a graph);
    the flags are put back on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def edit_factors(backbone: Backbone, modules: Sequence[nn.Linear], images: Sequence[Image.Image] | None,
                 prompts: Sequence[str], targets: Sequence[str]) -> list[LayerFactors]:
    """The factors of every module in ``modules`` for the loss Σ_rows mean NLL(row's target tokens).

    Each row's factors are those of its own edit alone (rows share no loss term). Works on a frozen
    backbone: the first hooked output is made to require grad, so the graph starts there.
    """
    batch = teacher_forced_batch(backbone, images, prompts, targets)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(index: int):
        def hook(module, args, output):
            if not output.requires_grad:
                output.requires_grad_(True)
            seen[index] = (args[0].detach(), output)
        return hook

    handles = [module.register_forward_hook(capture(i)) for i, module in enumerate(modules)]
    try:
        with torch.enable_grad():
            logits = backbone.forward(batch.inputs, use_cache=False).logits
            loss = sum(nn.functional.cross_entropy(batch.answer_logits(logits, row).float(), batch.labels(row))
                       for row in range(len(prompts)))
            grads = torch.autograd.grad(loss, [seen[i][1] for i in range(len(modules))], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    rows = len(prompts)
    real = batch.inputs["attention_mask"].bool()  # [B, T]
    factors = []
    for i in range(len(modules)):
        inputs = seen[i][0].float().reshape(rows, -1, seen[i][0].shape[-1])  # OPT's fc2 sees [B*T, F]
        output = seen[i][1]
        grad = torch.zeros_like(output) if grads[i] is None else grads[i]
        grad = grad.float().reshape(rows, -1, output.shape[-1])
        mask = real & (inputs != 0).any(-1) & (grad != 0).any(-1)
        factors.append(LayerFactors(inputs, grad, mask))
    return factors


class LowRankResidual(nn.Module):
    """One layer of the editor network: z → z + max(0, s_m ⊙ (U V z + b) + o_m), with U [dim, rank],
    V [rank, dim], and a scale s_m / shift o_m per edited layer m (the network is shared by the layers).

    U starts at zero, so the layer starts as the identity. The max is a clamp rather than ReLU on purpose:
    every pre-activation is exactly 0 at the start and ReLU's gradient there is 0, so nothing would learn.
    """

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator):
        super().__init__()
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.down = nn.Parameter(torch.randn(rank, dim, generator=generator) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (z @ self.down.T) @ self.up.T + self.bias
        return z + (pre * self.scale[mode] + self.shift[mode]).clamp(min=0)


class MendNet(nn.Module):
    """g: (u [..., F], δ [..., D]) → (ũ, δ̃), shared by the L edited layers (``mode`` picks the layer).

    The pair is concatenated into z [..., F + D], standardised per feature by running statistics of the
    training tokens (identity until statistics exist, or with ``norm`` off), passed through
    ``n_hidden + 1`` `LowRankResidual` layers of rank min(rank, F + D), and split back. ``edit_lrs`` [L]:
    the learned per-layer edit step α. A fresh network is the identity, so its edit is one step of
    gradient descent with step α.
    """

    def __init__(self, in_dim: int, out_dim: int, n_modes: int, rank: int, n_hidden: int, edit_lr: float,
                 norm: bool, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        dim = in_dim + out_dim
        self.in_dim, self.out_dim, self.norm = in_dim, out_dim, norm
        self.layers = nn.ModuleList(LowRankResidual(dim, min(rank, dim), n_modes, generator)
                                    for _ in range(n_hidden + 1))
        self.edit_lrs = nn.Parameter(torch.full((n_modes,), float(edit_lr)))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, z: torch.Tensor) -> None:
        """Fold the tokens z [N, F + D] into the running mean and variance (Chan et al.'s pairwise update).
        Under several processes (`attrib.parallel`) each holds its share of the batch's tokens: the shares'
        statistics are combined in rank order first, so every process folds in the whole batch."""
        z = z.double()
        shares = gather((float(len(z)), z.mean(0).cpu() if len(z) else None,
                         ((z - z.mean(0)) ** 2).sum(0).cpu() if len(z) else None))
        n, batch_mean, batch_m2 = 0.0, None, None
        for m, mean, m2 in shares:  # Chan et al.'s pairwise combination of the shares
            if m == 0:
                continue
            if batch_mean is None:
                n, batch_mean, batch_m2 = m, mean, m2
                continue
            step = mean - batch_mean
            batch_mean = batch_mean + step * m / (n + m)
            batch_m2 = batch_m2 + m2 + step ** 2 * n * m / (n + m)
            n += m
        if n == 0:
            return
        batch_mean, batch_m2 = batch_mean.to(self.mean.device), batch_m2.to(self.m2.device)
        total = self.count + n
        step = batch_mean - self.mean
        self.mean += step * n / total
        self.m2 += batch_m2 + step ** 2 * self.count * n / total
        self.count.fill_(total)

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        if not self.norm or self.count < 2:
            return z
        std = (self.m2 / (self.count - 1)).sqrt()
        return (z - self.mean.to(z.dtype)) / (std.to(z.dtype) + 1e-7)

    def forward(self, inputs: torch.Tensor, grads: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.standardise(torch.cat([inputs, grads], -1).float())
        for layer in self.layers:
            z = layer(z, mode)
        return z.split([self.in_dim, self.out_dim], -1)

    def transform(self, factors: Sequence[LayerFactors], observe: bool = False) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (ũ [B, T, F], δ̃ [B, T, D]) with masked tokens zeroed; ``observe``: update the
        statistics with the kept tokens first (training)."""
        if observe:
            for f in factors:
                self.observe(torch.cat([f.inputs, f.grads], -1)[f.mask])
        out = []
        for mode, f in enumerate(factors):
            u, d = self.forward(f.inputs, f.grads, mode)
            keep = f.mask.unsqueeze(-1).to(u.dtype)
            out.append((u * keep, d * keep))
        return out

    def weight_updates(self, transformed: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Per layer ΔW [D, F] = −α Σ_{b,t} δ̃ ũᵀ (all rows' edits summed)."""
        return [-self.edit_lrs[m] * torch.einsum("btd,btf->df", d, u) for m, (u, d) in enumerate(transformed)]


@contextmanager
def low_rank_update(modules: Sequence[nn.Linear], transformed: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    edit_lrs: torch.Tensor, rows: torch.Tensor) -> Iterator[None]:
    """Run forwards as if every ``modules[m]`` weight were W − α_m Σ_t δ̃_t ũ_tᵀ of the edit ``rows[b]``
    for row b of the batch (``transformed[m]`` holds the edits' factors [E, T, ·]); the weights are not
    touched and the result stays differentiable w.r.t. the factors and α."""
    def hook_for(m: int):
        u, d = transformed[m]
        index = rows.to(u.device)

        def hook(module, args, output):
            x = args[0].reshape(len(rows), -1, args[0].shape[-1]).float()  # [B, T, F]
            coefficients = torch.einsum("btf,bnf->btn", x, u[index])
            change = -edit_lrs[m] * torch.einsum("btn,bnd->btd", coefficients, d[index])
            return output + change.reshape(output.shape).to(output.dtype)
        return hook

    handles = [module.register_forward_hook(hook_for(m)) for m, module in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
