"""Region sets: which token indices each image region covers, at one site (LM visual tokens or ViT patches).

A region set is data: ``members[c]`` lists the site-token indices of region ``c`` (padded with -1),
``shape`` says how the regions tile for plotting (rows, cols), ``centers`` holds each region's own cell.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RegionSet:
    """Regions over the tokens of one site.

    members: LongTensor [C, W]: token indices into the site's token list, -1 = padding
    shape:   (rows, cols) with rows * cols == C, for heatmaps
    site:    "lm" (LM visual tokens) or "vit" (ViT patch tokens, CLS excluded)
    """

    name: str
    members: torch.Tensor
    shape: tuple[int, int]
    site: str
    window: int  # radius in cells; 0 = each region is a single token

    @property
    def n_regions(self) -> int:
        return self.members.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        """BoolTensor [C, W]: which member slots are real tokens."""
        return self.members >= 0


def grid_windows(rows: int, cols: int, radius: int, site: str) -> RegionSet:
    """One region per grid cell: the (2r+1)² window around it, clipped at the borders (VisEdit's rule)."""
    side = 2 * radius + 1
    members = torch.full((rows * cols, side * side), -1, dtype=torch.long)
    for r in range(rows):
        for c in range(cols):
            cells = [(rr, cc) for rr in range(r - radius, r + radius + 1) for cc in range(c - radius, c + radius + 1)
                     if 0 <= rr < rows and 0 <= cc < cols]
            members[r * cols + c, : len(cells)] = torch.tensor([rr * cols + cc for rr, cc in cells])
    return RegionSet(f"{site}_grid_r{radius}", members, (rows, cols), site, radius)


def single_tokens(count: int, site: str = "lm", name: str = "query_tokens") -> RegionSet:
    """Each token its own region (the per-query-token view of Q-Former backbones)."""
    return RegionSet(name, torch.arange(count).unsqueeze(1), (1, count), site, 0)


def default_radius(grid_side: int) -> int:
    """VisEdit uses r = 3 on LLaVA's 24 × 24 grid; keep the same fraction of the image on other grids."""
    return max(1, round(3 * grid_side / 24))
