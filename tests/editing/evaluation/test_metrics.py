"""Metrics on hand-made logits: known accuracies, agreements and percentages."""
from __future__ import annotations

import pytest
import torch

from editing.evaluation.metrics import (
    EditScores,
    RecordScores,
    RowPredictions,
    agreement,
    exact_match,
    score_record,
    token_accuracy,
    top_ids,
)

V = 12


def _logits(argmaxes: list[int]) -> torch.Tensor:
    """[n, V] logits whose argmax rows are ``argmaxes`` and whose other ranks are fixed by id."""
    logits = torch.arange(V, dtype=torch.float).repeat(len(argmaxes), 1) / 100  # ties broken by id
    for row, best in enumerate(argmaxes):
        logits[row, best] = 10.0
    return logits


def _row(labels: list[int], argmaxes: list[int], sequence: torch.Tensor | None = None, k: int = 10) -> RowPredictions:
    logits = _logits(argmaxes)
    sequence = logits if sequence is None else sequence
    return RowPredictions(torch.tensor(labels, dtype=torch.int32), top_ids(logits, k), top_ids(sequence, k))


def test_token_accuracy_and_exact_match():
    labels = torch.tensor([1, 2, 3])
    assert token_accuracy(_logits([1, 2, 4]).argmax(-1), labels) == pytest.approx(2 / 3)
    assert not exact_match(_logits([1, 2, 4]).argmax(-1), labels)
    assert exact_match(_logits([1, 2, 3]).argmax(-1), labels)


def test_agreement_counts_equal_entries_and_checks_shapes():
    assert agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        agreement(torch.zeros(2), torch.zeros(3))


def test_top_ids_are_ranked_best_first():
    ids = top_ids(_logits([5]), 3)
    assert ids.tolist() == [[5, 11, 10]] and ids.dtype == torch.int32


def test_score_record_visedit_and_easyedit_protocols():
    rel = _row([1, 2], [1, 2])  # 2/2, exact
    t_gen = _row([1, 2], [1, 3])  # 1/2
    m_gen = _row([1, 2, 3, 4], [0, 0, 0, 4])  # 1/4
    pre_t, post_t = _row([7, 7], [7, 7]), _row([7, 7], [7, 5])  # answer argmax agrees at 1 of 2
    # M-Loc over 4 sequence positions: after the edit, id 3 drops to the bottom at position 0, so that
    # position's top-10 list shifts by one rank (most ranks differ); the other 3 positions agree.
    pre_seq, post_seq = _logits([3, 3, 3, 3]), _logits([3, 3, 3, 3])
    post_seq[0, 3] = -1.0
    pre_m = _row([3], [3], pre_seq)
    post_m = _row([3], [3], post_seq)
    s = score_record(4, [rel, t_gen, m_gen], [pre_t, pre_m], [post_t, post_m], same_object=True, edit_ms=2.0)
    assert (s.rel, s.rel_em, s.t_gen, s.t_gen_em, s.m_gen, s.m_gen_em) == (1.0, True, 0.5, False, 0.25, False)
    assert s.t_loc == 0.5 and s.m_loc == 1.0
    assert s.t_loc_top1 == 0.5  # sequence top-1 of the T-Loc rows: [7, 7] vs [7, 5]
    pre_top, post_top = top_ids(pre_seq, 10), top_ids(post_seq, 10)
    expected = (pre_top == post_top).float().mean().item()
    assert s.m_loc_top10 == pytest.approx(expected) and 0.7 < expected < 1.0


def _scores(**kw) -> RecordScores:
    base = dict(index=0, rel=1.0, rel_em=True, t_gen=1.0, t_gen_em=True, m_gen=0.5, m_gen_em=False, t_loc=1.0,
                m_loc=1.0, t_loc_top1=1.0, m_loc_top10=0.9, same_object=None, edit_ms=1.0)
    return RecordScores(**{**base, **kw})


def test_summary_in_percent_with_same_object_split():
    scores = EditScores("vqa", [_scores(same_object=True, m_loc=0.5), _scores(index=1, same_object=False, rel=0.0,
                                                                             rel_em=False, edit_ms=3.0),
                                _scores(index=2)])
    out = scores.to_json()
    assert out["n_eval"] == 3 and out["rel"] == pytest.approx(66.67) and out["m_gen"] == 50.0
    assert out["m_loc"] == pytest.approx(83.33) and out["t_loc"] == 100.0
    assert out["exact_match"] == {"rel": pytest.approx(66.67), "t_gen": 100.0, "m_gen": 0.0}
    assert (out["m_loc_same_object"], out["m_loc_other"], out["n_same_object"], out["n_other"]) == (50.0, 100.0, 1, 1)
    assert out["secondary"]["m_loc_top10"] == 90.0 and "EasyEdit" in out["secondary"]["protocol"]
    assert out["edit_ms"] == pytest.approx(5 / 3, abs=1e-3)
    empty = EditScores("vqa").to_json()
    assert empty["rel"] is None and empty["m_loc_same_object"] is None


def test_suffix_agreement_compares_the_unedited_row_with_the_longer_rows_end():
    from editing.evaluation.metrics import suffix_agreement

    pre = torch.tensor([[1], [2], [3]])
    post = torch.tensor([[9], [9], [1], [2], [4]])  # two context positions in front; the last id differs
    assert suffix_agreement(pre, post) == pytest.approx(2 / 3)
    assert suffix_agreement(pre, pre) == 1.0
