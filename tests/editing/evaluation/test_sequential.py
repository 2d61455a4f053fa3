"""The chunked lifelong protocol's bookkeeping, on a fake editor whose answers are known: it remembers only
its latest ``capacity`` edits and, with more than that live, disturbs every text-only answer."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attrib.data import load_records
from editing.editor import Editor
from editing.evaluation import sequential
from editing.evaluation.evaluate import RestoreError
from editing.evaluation.metrics import RowPredictions


def _row(right: bool) -> RowPredictions:
    top = torch.tensor([[5 if right else 6]])
    return RowPredictions(torch.tensor([5]), top, top)


class Forgetful(Editor):
    lifelong = True

    def __init__(self, capacity: int, leaky: bool = False):
        self.backbone, self.capacity, self.leaky = None, capacity, leaky
        self.live: list = []
        self.locality_calls: list[int] = []  # how many edits were live at each record's locality rows
        self.block_sizes: list[int] = []  # records per locality call

    def edit(self, request) -> None:
        self.live.append(request)

    def restore(self) -> None:
        self.live = self.live[:1] if self.leaky else []


@pytest.fixture
def fake(monkeypatch):
    """Records stand in for requests; predictions come from what the editor holds."""
    monkeypatch.setattr(sequential.EditRequest, "from_record", staticmethod(lambda record, task, formats: record))
    monkeypatch.setattr(sequential, "_generality", lambda editor, records, fmt: [
        [_row(record in editor.live[-editor.capacity:])] * 3 for record in records])

    def locality(editor, records, formats):
        editor.locality_calls.extend([len(editor.live)] * len(records))
        editor.block_sizes.append(len(records))
        return [[_row(len(editor.live) <= editor.capacity), _row(True), _row(True)] for _ in records]

    monkeypatch.setattr(sequential, "_locality", locality)
    monkeypatch.setattr(sequential, "_probe_logits", lambda editor, probe: torch.tensor([float(len(editor.live))]))
    # a forward takes 10 ms more for every live edit: the latency ratio with N live is 1 + N
    monkeypatch.setattr(sequential, "forward_seconds", lambda editor, images, prompts: 0.01 * (1 + len(editor.live)))


@pytest.fixture(scope="module")
def records(tiny_world):
    three = load_records(tiny_world / "vqa_eval.json")
    return [replace(three[i % 3], index=i) for i in range(12)]  # 12 distinct edits


@pytest.mark.parametrize("n_live, rel, t_loc, chunks", [(1, 100.0, 100.0, 12), (2, 100.0, 100.0, 6),
                                                        (5, 60.0, 0.0, 2), (12, 25.0, 0.0, 1)])
def test_chunks_score_every_edit_with_all_n_live(fake, records, n_live, rel, t_loc, chunks):
    editor = Forgetful(capacity=3)
    result = sequential.evaluate_sequential(editor, records, n_live)
    scored = chunks * n_live
    assert editor.locality_calls[:scored] == [0] * scored  # pre-edit outputs before any edit
    assert editor.locality_calls[scored:] == [n_live] * scored  # scored with all N live
    assert (result["n_live"], result["n_chunks"], result["n_eval"]) == (n_live, chunks, chunks * n_live)
    assert result["n_left_out"] == len(records) - chunks * n_live
    assert (result["rel"], result["t_gen"], result["m_gen"]) == (rel, rel, rel)
    assert (result["t_loc"], result["m_loc"], result["loc_same_image"]) == (t_loc, 100.0, 100.0)
    assert result["edit_ms"] >= 0 and result["latency_ratio"] == 1 + n_live and editor.live == []
    assert result["latency_s"] == {"unedited_before_s": 0.01, "edited_s": round(0.01 * (1 + n_live), 5),
                                   "unedited_after_s": 0.01}


@pytest.mark.parametrize("n_live", [1, 5, 12])
def test_latency_alone_is_measured_with_the_first_n_edits_live(fake, records, n_live):
    editor = Forgetful(capacity=3)
    assert sequential.measure_latency(editor, records, n_live)["latency_ratio"] == 1 + n_live
    assert editor.live == []
    with pytest.raises(RestoreError, match=f"restoring {n_live} live edits"):
        sequential.measure_latency(Forgetful(capacity=3, leaky=True), records, n_live)
    with pytest.raises(ValueError, match="13 live edits of 12"):
        sequential.measure_latency(editor, records, 13)


def test_reuses_given_pre_edit_outputs_of_its_n_only(fake, records):
    editor = Forgetful(capacity=3)
    pre = sequential.pre_edit_locality(editor, records, 4)
    editor.locality_calls.clear()
    sequential.evaluate_sequential(editor, records, 4, pre=pre)
    assert editor.locality_calls == [4] * len(records)
    with pytest.raises(ValueError, match="blocks for 4 live, not 12 for 6"):
        sequential.evaluate_sequential(editor, records, 6, pre=pre)


@pytest.mark.parametrize("n_live, sizes", [(1, [1] * 12), (5, [5, 5]), (12, [12])])
def test_pre_and_post_locality_rows_come_in_the_same_blocks(fake, records, monkeypatch, n_live, sizes):
    monkeypatch.setattr(sequential, "BLOCK", 4)
    assert [list(b) for b in sequential.blocks(11, 5)] == [[0, 1, 2, 3], [4], [5, 6, 7, 8], [9]]
    editor = Forgetful(capacity=3)
    sequential.evaluate_sequential(editor, records, n_live)
    blocked = [size for s in sizes for size in [4] * (s // 4) + ([s % 4] if s % 4 else [])]
    assert editor.block_sizes == blocked + blocked  # step 2, then step 3 in the same blocks


def test_an_inexact_restore_is_caught(fake, records):
    with pytest.raises(RestoreError, match="chunk 0"):
        sequential.evaluate_sequential(Forgetful(capacity=3, leaky=True), records, 4)


def test_refuses_editors_that_hold_one_edit_and_chunks_that_cannot_fill(fake, records):
    single = Forgetful(capacity=3)
    single.lifelong = False
    with pytest.raises(ValueError, match="one edit at a time"):
        sequential.evaluate_sequential(single, records, 2)
    with pytest.raises(ValueError, match="cannot fill one chunk of 13"):
        sequential.evaluate_sequential(Forgetful(capacity=3), records, 13)


def test_batched_generality_rows_equal_one_record_at_a_time(tiny_backbone, tiny_world, make_editor):
    """The shortcut (16 edits' rows in one forward) against the single-edit evaluation's one-by-one rows,
    with two edits live in VisEdit's bank."""
    from attrib.prompts import load_prompts
    from editing.editor import EditRequest
    from editing.evaluation import evaluate

    records = load_records(tiny_world / "vqa_eval.json")
    formats = load_prompts()
    editor = make_editor(tiny_backbone, -1)
    for record in records[:2]:
        editor.edit(EditRequest.from_record(record, "vqa", formats))
    batched = sequential._generality(editor, records, formats["vqa"])
    for record, rows in zip(records, batched, strict=True):
        for one, many in zip(evaluate._generality(editor, record, formats["vqa"]), rows, strict=True):
            assert torch.equal(one.labels, many.labels) and torch.equal(one.answer_top, many.answer_top)


def test_batched_locality_rows_equal_one_record_at_a_time(tiny_backbone, tiny_world, make_editor):
    """A block's locality rows (T-Loc rows in one forward, M-Loc and same-image rows in another) against
    the single-edit evaluation's rows of one record at a time, with two edits live in VisEdit's bank."""
    from attrib.prompts import load_prompts
    from editing.editor import EditRequest
    from editing.evaluation import evaluate

    records = load_records(tiny_world / "vqa_eval.json")
    formats = load_prompts()
    editor = make_editor(tiny_backbone, -1)
    for record in records[:2]:
        editor.edit(EditRequest.from_record(record, "vqa", formats))
    batched = sequential._locality(editor, records, formats)
    for record, rows in zip(records, batched, strict=True):
        alone = evaluate._locality(editor, record, formats)
        assert len(alone) == len(rows) >= 3  # T-Loc, M-Loc and at least one same-image question
        for one, many in zip(alone, rows, strict=True):
            assert torch.equal(one.labels, many.labels)
            assert torch.equal(one.answer_argmax, many.answer_argmax)
