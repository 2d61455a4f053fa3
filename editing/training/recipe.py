"""What VisEdit's adapter and its training default to when a run does not say: the adapter's sizes from the
language model's width, the learning rate, and the number of steps per backbone. `visedit edit`, the
`visedit` and `visedit_gated` methods of `visedit compare` and the benchmarks all read them here.
"""
from __future__ import annotations

from editing.adapter.vead import VeadConfig


def default_steps(backbone: str, task: str = "vqa") -> int:
    """Training steps when none are asked for: 2,000 (at 1,000 the losses were still falling fast; twice as
    many gained nothing beyond the run-to-run spread), 1,750 for LLaVA, whose rows carry 64 visual tokens
    (a step takes ~4x BLIP-2's) and whose T-Gen fell at 1,500 (docs/experiments/editing-training.md).
    LLaVA's captions take 3,500: on dev, twice 1,750 raised the mean of five from 90.6 to 92.1 and exact
    captions from 16.7 to 21.0 % (docs/experiments/open-problems.md, "LLaVA's captions")."""
    if backbone == "llava":
        return 3500 if task == "caption" else 1750
    return 2000


def default_lr(width: int) -> float:
    """Adam LR of the adapter: the paper's 1e-4 for 7B-scale LMs (width ≥ 2048); 1e-3 below, where 1e-4
    learnt less than half as fast on the 128-wide defaults (docs/experiments/editing-training.md)."""
    return 1e-4 if width >= 2048 else 1e-3


def sized_vead_config(width: int, mid_dim: int | None = None, heads: int | None = None,
                      scene_gate: bool = False, scene_similarity: str = "salient",
                      target_role: bool = False) -> VeadConfig:
    """Adapter sizes from the LM width: the paper's mid 1024 from width 2048 up (7B: 4096 → 1024,
    OPT-2.7B: 2560 → 1024), the width itself below (small LMs would otherwise get a wider adapter than
    model); heads: the largest of 8, 4, 2, 1 that divides."""
    mid = mid_dim or (1024 if width >= 2048 else width)
    pick = lambda n: next(h for h in (8, 4, 2, 1) if n % h == 0)  # noqa: E731
    return VeadConfig(mid_dim=mid, n_heads=heads or pick(mid), im_hidden=mid, im_heads=pick(width),
                      scene_gate=scene_gate, scene_similarity=scene_similarity, target_role=target_role)
