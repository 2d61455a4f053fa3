"""The single-edit evaluation loop on a tiny world: every metric key, pre-edit caching, restore checks."""
from __future__ import annotations

import dataclasses

import pytest

from attrib.data import DataError, load_records
from editing.evaluation.evaluate import RestoreError, evaluate_edits
from tests.editing.conftest import FlagEditor, one_token_everywhere

KEYS = {"task", "n_eval", "n_skipped", "protocol", "rel", "t_gen", "m_gen", "t_loc", "m_loc", "exact_match",
        "m_loc_same_object", "m_loc_other", "n_same_object", "n_other", "secondary", "edit_ms", "loc_same_image",
        "n_same_image", "targets"}


def test_runs_on_every_backbone_and_returns_all_metrics(tiny_backbone, tiny_world, make_editor):
    editor = make_editor(tiny_backbone, 0)
    records = load_records(tiny_world / "vqa_eval.json")
    out = evaluate_edits(editor, records).to_json()
    assert set(out) == KEYS and out["n_eval"] == 3
    assert set(out["exact_match"]) == {"rel", "t_gen", "m_gen"}
    assert set(out["secondary"]) == {"protocol", "t_loc_top1", "m_loc_top10"}
    for key in ("rel", "t_gen", "m_gen", "m_loc"):
        assert 0.0 <= out[key] <= 100.0
    assert out["t_loc"] == 100.0 and out["secondary"]["t_loc_top1"] == 100.0  # text-only inputs bypass
    assert out["n_same_object"] + out["n_other"] == 2  # the count question names no object
    assert out["n_same_image"] == 3 and 0.0 <= out["loc_same_image"] <= 100.0
    assert out["targets"]["novel"]["n"] + out["targets"]["known"]["n"] == 3
    assert not editor.is_edited


def test_same_image_locality_sees_an_edit_that_rewrites_its_image(llava, tiny_world, monkeypatch):
    records = load_records(tiny_world / "vqa_eval.json")
    everything = one_token_everywhere(monkeypatch, llava, 7)  # every image row now answers token 7
    rewrite = evaluate_edits(everything, records).to_json()
    assert rewrite["loc_same_image"] < 50.0 and rewrite["m_loc"] < 50.0 and rewrite["t_loc"] == 100.0

    untouched = evaluate_edits(FlagEditor(llava), records).to_json()
    assert untouched["loc_same_image"] == 100.0 and untouched["m_loc"] == 100.0


def test_same_image_locality_is_absent_without_the_questions(llava, tiny_world, make_editor, tmp_path):
    # A copy of the file without truth.json beside it: real MMEdit data has no same-image questions.
    (tmp_path / "vqa_eval.json").write_text((tiny_world / "vqa_eval.json").read_text())
    records = load_records(tmp_path / "vqa_eval.json", image_root=tiny_world)
    out = evaluate_edits(make_editor(llava, 0), records).to_json()
    assert out["loc_same_image"] is None and out["n_same_image"] == 0 and out["targets"] is None


def test_captions(llava, tiny_world, make_editor):
    editor = make_editor(llava, -1)
    out = evaluate_edits(editor, load_records(tiny_world / "caption_eval.json"), task="caption").to_json()
    assert out["task"] == "caption" and out["n_eval"] == 1 and out["n_same_object"] == 1


def test_pre_edit_outputs_are_cached_before_any_edit(llava, tiny_world, make_editor, monkeypatch):
    editor = make_editor(llava, 0)
    events = []
    import editing.evaluation.evaluate as evaluation

    real = evaluation._locality
    monkeypatch.setattr(evaluation, "_locality", lambda e, r, f: events.append(("loc", e.is_edited)) or real(e, r, f))
    evaluate_edits(editor, load_records(tiny_world / "vqa_eval.json"))
    pre = [edited for _, edited in events[:3]]
    assert pre == [False, False, False] and [edited for _, edited in events[3:]] == [True] * 3


def test_a_failed_restore_is_caught(llava, tiny_world, make_editor):
    editor = make_editor(llava, 0)
    real_restore = editor.restore
    editor.restore = lambda: None  # sabotage: the edit stays in place
    with pytest.raises(RestoreError, match="record 0"):
        evaluate_edits(editor, load_records(tiny_world / "vqa_eval.json", n=1))
    real_restore()


def test_bad_records_stop_or_are_skipped(llava, tiny_world, make_editor):
    editor = make_editor(llava, 0)
    records = load_records(tiny_world / "vqa_eval.json")
    records[1] = dataclasses.replace(records[1], fields={**records[1].fields, "m_loc": "images/missing.png"})
    with pytest.raises(DataError, match="record 1, field 'm_loc'"):
        evaluate_edits(editor, records)
    scores = evaluate_edits(editor, records, skip_bad=True)
    assert scores.n_skipped == 1 and len(scores.records) == 2 and "record 1" in scores.skipped[0]
