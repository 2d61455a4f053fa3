"""Where text positions should look in the image, and the terms that press them to.

The attention stages of the default recipes add two terms to the language loss: `object_attention_loss`
(a position's attention within the image pressed onto given grid cells: the answer position onto the
asked-about object, each direction word of a position question onto the half it names) and, on the
Q-Former backbones, `layout_loss` (each query token's cross-attention onto its own block of patches, so
the query tokens form a grid the looks can use).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from attrib.defaults.batches import IGNORE, Templates, split_prompt
from attrib.world.questions import region_box


def target_cells(box: tuple[int, int, int, int], grid: int, patch: int) -> list[int]:
    """Row-major indices of the grid cells a pixel box touches (on a patch-snapped box, those it covers)."""
    x0, y0 = box[0] // patch, box[1] // patch
    x1, y1 = -(-box[2] // patch), -(-box[3] // patch)
    return [row * grid + col for row in range(y0, y1) for col in range(x0, x1)]


class Look(NamedTuple):
    """A text position of one continuation row that should look at given grid cells of the image."""

    row: int
    at: int  # index into the row
    cells: list[int]


def answer_looks(labels: torch.Tensor, cells: list[list[int] | None]) -> list[Look]:
    """The position predicting each row's first target token, looking at ``cells[r]`` (None: no look)."""
    first = (labels != IGNORE).float().argmax(1)
    return [Look(r, int(first[r]) - 1, c) for r, c in enumerate(cells) if c]


def object_attention_loss(attentions: dict[int, torch.Tensor], prefix_ids: torch.Tensor, image_token_id: int,
                          looks: list[Look], through: torch.Tensor | None = None) -> torch.Tensor:
    """How far text positions' looks at the image miss the cells they should look at.

    For each look, in every given layer: the share of the heads' summed attention on the image tokens
    that lands on the look's cells; the loss is the mean of -log(share) over layers and looks. Only where
    the model looks within the image is pressed, not how much it looks at the image at all. Zero without
    looks.

    ``through`` [looks, image tokens, cells], when the image tokens are not the grid's cells (a Q-Former's
    queries): how each image token's attention spreads over the cells, rows summing to 1; an image token
    then counts toward a look by the share of it that lands on the look's cells, and gradient reaches both
    the LM's attention and that spread.
    """
    image_at = (prefix_ids[0] == image_token_id).nonzero()[:, 0]
    if not ((prefix_ids == image_token_id).sum(1) == len(image_at)).all():
        raise ValueError("every image prefix must hold the same image token positions")
    if not looks:
        return torch.zeros(())
    rows, at = torch.tensor([k.row for k in looks]), torch.tensor([k.at for k in looks])
    if through is None:
        hit = torch.zeros(len(looks), len(image_at), dtype=torch.bool)
        for k, look in enumerate(looks):
            hit[k, look.cells] = True
    else:
        if through.shape[:2] != (len(looks), len(image_at)):
            raise ValueError(f"through {tuple(through.shape)} does not match {len(looks)} looks at "
                             f"{len(image_at)} image tokens")
        hit = torch.stack([through[k][:, look.cells].sum(-1) for k, look in enumerate(looks)])
    terms = []
    for weights in attentions.values():
        on_image = weights[rows, :, at][:, :, image_at].sum(1)  # [looks, image tokens], heads summed
        share = (on_image * hit).sum(1) / on_image.sum(1).clamp(min=1e-9)
        terms.append(-torch.log(share + 1e-6))
    return torch.stack(terms).mean()


def layout_cells(n_queries: int, grid: int) -> list[list[int]]:
    """Each query token's block of the patch grid: the grid cut into a √n × √n layout of equal blocks,
    queries in row-major order (16 queries on 8 × 8 patches: query 5 owns rows 2-3, columns 2-3)."""
    side = math.isqrt(n_queries)
    if side * side != n_queries or grid % side:
        raise ValueError(f"{n_queries} query tokens do not tile a {grid} x {grid} patch grid")
    block = grid // side
    return [[row * grid + col for row in range(qr * block, (qr + 1) * block)
             for col in range(qc * block, (qc + 1) * block)]
            for qr in range(side) for qc in range(side)]


def layout_loss(cross_attention: torch.Tensor, cells: list[list[int]], has_cls: bool) -> torch.Tensor:
    """How far each query token's cross-attention over the image misses its own block of patches.

    ``cross_attention`` [images, heads, queries, keys] (keys: the vision tower's outputs, CLS first when
    ``has_cls``); per query and image, the share of the heads' summed attention that lands on the query's
    cells; the loss is the mean of -log(share).
    """
    images, _, queries, keys = cross_attention.shape
    if len(cells) != queries:
        raise ValueError(f"{len(cells)} layout blocks for {queries} query tokens")
    hit = torch.zeros(queries, keys, dtype=torch.bool)
    for q, block in enumerate(cells):
        hit[q, [c + int(has_cls) for c in block]] = True
    weights = cross_attention.sum(1)  # [images, queries, keys]
    share = (weights * hit).sum(-1) / weights.sum(-1).clamp(min=1e-9)
    return -torch.log(share + 1e-6).mean()


def query_spread(cross_attention: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """[images, queries, patches]: how each query token's cross-attention (``cross_attention`` [images, heads,
    queries, keys], CLS first when ``has_cls``) spreads over the patch grid, heads summed, the CLS share
    left out and each row renormalised to 1."""
    weights = cross_attention.sum(1)[..., int(has_cls):]
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-9)


class CrossAttentionTap:
    """Keeps the attention weights of a Q-Former cross-attention module's last forward (with gradient);
    the module must run eager attention. A context manager: the hook goes when the block ends."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.weights, self._handle = module, None, None

    def __enter__(self) -> "CrossAttentionTap":
        self._handle = self.module.register_forward_hook(self._keep)
        return self

    def _keep(self, module, inputs, output) -> None:
        if output[1] is None:
            raise ValueError("cross-attention weights asked for, but the Q-Former runs without them "
                             "(use eager attention)")
        self.weights = output[1]

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _token_ending_at(tokenizer, text: str, char_end: int) -> int:
    """Index of the token of ``text`` that ends at character ``char_end`` (a token boundary)."""
    head = tokenizer(text[:char_end], add_special_tokens=False).input_ids
    if tokenizer(text, add_special_tokens=False).input_ids[: len(head)] != head:
        raise ValueError(f"{text[:char_end]!r} does not end on a token boundary of {text!r}")
    return len(head) - 1


DIRECTIONS = ("top", "bottom", "left", "right")


def direction_looks(tokenizer, templates: Templates, prompt: str, question, row: int, grid: int,
                    image_size: int) -> list[Look]:
    """Each direction word of a position question's region ("top" and "left" of "top left") looking at
    the half of the image it names; none for other questions."""
    region = question.slots.get("region")
    if region is None:
        return []
    continuation = split_prompt(templates, prompt)
    start = continuation.index(question.text) + question.text.index(region)
    looks, offset = [], 0
    for word in region.split():
        offset = region.index(word, offset) + len(word)
        if word in DIRECTIONS:
            at = _token_ending_at(tokenizer, continuation, start + offset)
            looks.append(Look(row, at, target_cells(region_box(f"{word} half", image_size), grid, image_size // grid)))
    return looks
