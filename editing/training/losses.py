"""VisEdit's training losses, as plain functions of log-probabilities and IM logits.

Shapes: R rows, K answer positions per row (padded, ``mask`` [R, K] marks the real ones), V vocabulary;
B edits, k sampled visual tokens per edit.

- reliability / generality: token-level NLL of the target, averaged over all real target tokens of
  the rows (the official ``label_loss``);
- locality: KL(p_pre ‖ p_post) per M-Loc answer position, averaged over the real positions;
- IM alignment: −Σ_i c_i log softmax(IM)_i over the sampled tokens (c sums to 1 per edit), mean over
  edits; IM up: −mean log σ(IM) on a reliability / generality sample; IM down: −mean log(1 − σ(IM)) on
  the locality image. log σ is computed as logsigmoid (the official ``log(σ + 1e-8)`` saturates).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def target_nll(logp: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logp [R, K, V], labels [R, K], mask [R, K] → mean NLL over the real target tokens."""
    picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [R, K]
    return -(picked * mask).sum() / mask.sum().clamp(min=1)


def locality_kl(pre_logp: torch.Tensor, post_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_pre ‖ p_post) at each real position of [R, K, V] log-probs, averaged over them."""
    kl = (pre_logp.exp() * (pre_logp - post_logp)).sum(-1)  # [R, K]
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def im_alignment(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, k] IM logits of the sampled tokens, targets [B, k] (rows sum to 1) → cross-entropy."""
    return -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()


def im_up(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Open the gate on the edited image: −mean log σ(logits); with ``weights`` [B, k] (rows summing to 1),
    −Σ_i w_i log σ(logits_i) per edit, averaged over edits."""
    if weights is None:
        return -F.logsigmoid(logits).mean()
    return -(weights * F.logsigmoid(logits)).sum(-1).mean()


def im_down(logits: torch.Tensor) -> torch.Tensor:
    """Close the gate on an unrelated image: −mean log(1 − σ(logits)) = −mean logsigmoid(−logits)."""
    return -F.logsigmoid(-logits).mean()
