"""The one forward the method tests compare before and after an edit: full-sequence logits, no gradients."""
from __future__ import annotations

import torch


def logits(backbone, images, prompts: str | list[str]) -> torch.Tensor:
    """[batch, seq, vocab] logits of ``prompts`` (one string or a list) with ``images`` (None: text only)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    with torch.no_grad():
        return backbone.forward(backbone.encode(images, prompts), use_cache=False).logits
