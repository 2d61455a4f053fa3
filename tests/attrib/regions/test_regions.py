"""Region sets: windows on a grid, clipped at its borders."""
from __future__ import annotations

from attrib.regions.regions import grid_windows


def test_grid_windows_clip_at_borders():
    regions = grid_windows(4, 4, 1, "lm")
    assert regions.valid[0].sum() == 4 and regions.valid[5].sum() == 9
    assert sorted(regions.members[0][regions.valid[0]].tolist()) == [0, 1, 4, 5]
