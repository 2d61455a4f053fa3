"""IM maps: read under each edit, scored by the pointing game on LLaVA's grid, skipped for Q-Former backbones."""
from __future__ import annotations

import torch

from attrib.data import load_records
from editing.localisation import QFORMER_NOTE, ImMaps, im_maps


def test_maps_follow_each_edit(tiny_backbone, tiny_world, make_editor):
    editor = make_editor(tiny_backbone, 0)
    records = load_records(tiny_world / "vqa_eval.json")
    maps = im_maps(editor, records, limit=2)
    assert maps.gates.shape == (2, tiny_backbone.n_visual_tokens) and maps.indices == [0, 1]
    assert ((maps.gates > 0) & (maps.gates < 1)).all() and not editor.is_edited
    score = maps.pointing_game()
    if tiny_backbone.spec.grid_site == "lm":
        assert maps.grid is not None and 0.0 <= score <= 100.0
    else:
        assert score is None and maps.note == QFORMER_NOTE
    assert maps.plot(n=2) is not None


def test_pointing_game_on_a_constructed_map():
    gates = torch.zeros(2, 4)
    gates[0, 3] = 1.0  # bottom-right cell of a 2 x 2 grid
    gates[1, 0] = 1.0  # top-left
    maps = ImMaps(gates, [0, 1], [(32, 32, 64, 64), (32, 32, 64, 64)], [(64, 64)] * 2, (2, 2))
    assert maps.pointing_game() == 50.0
    unboxed = ImMaps(gates, [0, 1], [None, None], [(64, 64)] * 2, (2, 2))
    assert unboxed.pointing_game() is None and "no record has a truth box" in unboxed.note
