"""Routing ranks: the summary on constructed score matrices, and the loop reading the bank's own scores."""
from __future__ import annotations

import pytest
import torch

from attrib.data import load_records
from editing.editor import EditRequest
from editing.evaluation.routing import RoutingRanks, routing_ranks
from tests.editing.conftest import FlagEditor


def test_an_own_edit_that_stands_out_comes_first_and_explains_no_edit_or_input_variance():
    out = RoutingRanks(torch.eye(4)[None], [["count", "count", "position", "position"]]).to_json()
    assert out["own_top"] == 100.0 and out["own_rank_mean"] == 0.0
    assert out["variance_share"] == {"edit": 0.0, "input": 0.0, "rest": 100.0}
    assert out["own_score_mean"] == 1.0 and out["other_score_mean"] == 0.0
    assert out["score_by_edit_family"] == {"count": 0.25, "position": 0.25}


def test_a_loud_edit_wins_every_input():
    scores = torch.arange(4.0).expand(4, 4)[None]  # edit j scores j on every input
    out = RoutingRanks(scores, [["a", "b", "c", "d"]]).to_json()
    assert out["loudest_edit_wins"] == 100.0 and out["own_top"] == 25.0  # only the loud edit's own input
    assert out["variance_share"]["edit"] == 100.0 and out["own_rank_mean"] == pytest.approx(1.5)


def test_the_loop_reads_the_scores_the_bank_routes_by(llava, tiny_world, make_editor):
    editor = make_editor(llava, 0)
    records = load_records(tiny_world / "vqa_eval.json")
    ranks = routing_ranks(editor, records, n_live=3)
    assert ranks.scores.shape == (1, 3, 3) and not editor.is_edited
    # the same number by hand: the three edits live, record 1's input routed, its IM scores read
    bank = editor.hook.bank
    for record in records:
        editor.edit(EditRequest.from_record(record))
    prompt = EditRequest.from_record(records[1]).prompt
    with torch.no_grad():
        llava.forward(llava.encode([records[1].load_image("image")], [prompt]), use_cache=False)
    assert torch.equal(bank.last_scores[0].float(), ranks.scores[0, 1])
    editor.restore()
    assert bank.last_scores is None


def test_an_editor_without_a_bank_is_refused(llava, tiny_world, make_editor):
    records = load_records(tiny_world / "vqa_eval.json")
    with pytest.raises(ValueError, match="edit bank, not FlagEditor"):
        routing_ranks(FlagEditor(llava), records)
    with pytest.raises(ValueError, match="no chunk of 10"):
        routing_ranks(make_editor(llava, 0), records, n_live=10)
