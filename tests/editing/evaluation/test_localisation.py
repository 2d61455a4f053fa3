"""IM maps: read under each edit, scored by the pointing game on LLaVA's grid, skipped for Q-Former backbones."""
from __future__ import annotations

import torch

from attrib.data import load_records
from attrib.prompts import load_prompts
from editing.editor import EditRequest
from editing.evaluation.localisation import QFORMER_NOTE, ImMaps, im_maps


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


def test_unrelated_gate_is_read_under_the_same_edit(tiny_backbone, tiny_world, make_editor):
    editor = make_editor(tiny_backbone, 0)
    record = load_records(tiny_world / "vqa_eval.json")[1]
    maps = im_maps(editor, [record])
    formats = load_prompts()
    editor.edit(EditRequest.from_record(record, "vqa", formats))
    try:
        prompt = formats["m_loc"].format(m_loc_q=record.m_loc_q)
        tiny_backbone.forward(tiny_backbone.encode([record.load_image("m_loc")], [prompt]), use_cache=False)
        logits = editor.hook.last_gate_logits[0].float().cpu()
    finally:
        editor.restore()
    expected = torch.sigmoid(logits[-maps.unrelated.shape[1]:])
    torch.testing.assert_close(maps.unrelated[0], expected)
    means = maps.gate_means()
    assert means["edit_image"] == round(maps.gates.mean().item(), 4)
    assert means["unrelated_image"] == round(expected.mean().item(), 4)


def test_pointing_game_on_a_constructed_map():
    gates = torch.zeros(2, 4)
    gates[0, 3] = 1.0  # bottom-right cell of a 2 x 2 grid
    gates[1, 0] = 1.0  # top-left
    maps = ImMaps(gates, [0, 1], [(32, 32, 64, 64), (32, 32, 64, 64)], [(64, 64)] * 2, (2, 2))
    assert maps.pointing_game() == 50.0
    unboxed = ImMaps(gates, [0, 1], [None, None], [(64, 64)] * 2, (2, 2))
    assert unboxed.pointing_game() is None and "no record has a truth box" in unboxed.note
