"""Lifelong (sequential) evaluation: N edits live at once, every one of them scored with all N applied.

    scores = evaluate_sequential(editor, test_records, n_live=100, task="vqa")
    scores["rel"], scores["edit_ms"], scores["latency_ratio"], scores["rss_growth_mb"]

The protocol of LiveEdit (CVPR 2025), for an editor whose edits accumulate (``Editor.lifelong``):
1. the records are split, in order, into chunks of ``n_live`` (a last chunk shorter than ``n_live`` is
   left out and counted: every reported edit saw exactly N live), and each chunk into blocks of up to 16
   consecutive records;
2. ``restore()``; the pre-edit T-Loc, M-Loc and same-image predictions of every scored record are
   computed before any edit (`pre_edit_locality`), block by block: the T-Loc rows of a block in one
   text-only forward, its M-Loc and same-image rows in one forward with the image;
3. per chunk: the N edits are applied one after another (each timed); then each block of the chunk is
   scored with all N still live — Rel, T-Gen, M-Gen of each edit's own target (the block's rows in one
   forward) and its localities in the same two forwards as in step 2, so a locality row is compared with
   the unedited prediction of the very same batch (padding included), and only the edits can make them
   differ; ``restore()``, after which the probe's logits must be bit-identical to the unedited model's
   (`RestoreError`).

Beyond the single-edit scores (`EditScores.to_json`): ``n_live``, ``n_chunks``, ``n_left_out``,
``edit_ms`` (mean time of one edit while earlier edits of its chunk are live), ``latency_ratio`` (the
forward of a batch of the first chunk's first min(4, N) edit prompts with that chunk's N edits live, over
the unedited forward just before those edits and just after their restore, `editing.evaluation.latency`;
every row of the batch is a live edit's, so a routing editor routes it; the unedited model's ratio is the
noise floor; `measure_latency` measures it alone),
``rss_growth_mb`` (the process's resident memory after the chunk's N edits minus before them, largest over
the chunks: what holding N edits costs, noisy below a few MiB).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from attrib.data import EditRecord
from attrib.prompts import load_prompts
from editing.editor import Editor, EditRequest
from editing.evaluation.evaluate import M_LOC_TOP_K, RestoreError, SameObject, _probe_logits, locality_rows
from editing.evaluation.latency import forward_seconds, latency_ratio
from editing.evaluation.metrics import EditScores, RowPredictions, predict_rows, score_record
from editing.evaluation.same_object import WorldSameObject

LATENCY_ROWS = 4  # inputs of the latency batch, as in the single-edit `inference_overhead`
BLOCK = 16  # records scored together: their Rel / T-Gen / M-Gen rows share one forward (48 rows), their
# T-Loc rows another, their M-Loc and same-image rows a third


def _generality(editor: Editor, records: Sequence[EditRecord], edit_prompt: str) -> list[list[RowPredictions]]:
    """[Rel, T-Gen, M-Gen] predictions of each record's own target, the rows of all ``records`` in one
    forward: with every edit of the chunk live, the rows of different edits see the same model (what the
    single-edit evaluation's `evaluate._generality` computes one record at a time)."""
    images, prompts, targets = [], [], []
    for record in records:
        image = record.load_image("image")
        images += [image, image, record.load_image("image_rephrase")]
        prompts += [edit_prompt.format(src=record.src), edit_prompt.format(src=record.rephrase),
                    edit_prompt.format(src=record.src)]
        targets += [record.alt] * 3
    rows = predict_rows(editor.backbone, images, prompts, targets, k=1)
    return [rows[3 * i:3 * i + 3] for i in range(len(records))]


def resident_mb() -> float:
    """The process's resident memory now, in MiB (Linux ``/proc/self/statm``)."""
    import resource

    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def blocks(n_records: int, n_live: int) -> list[range]:
    """Positions of the scored records, chunk by chunk (chunks of ``n_live``; a last shorter chunk left
    out), each chunk cut into blocks of up to `BLOCK`: the batches of the module docstring."""
    return [range(start + lo, start + min(lo + BLOCK, n_live))
            for start in range(0, n_records // n_live * n_live, n_live) for lo in range(0, n_live, BLOCK)]


def _locality(editor: Editor, records: Sequence[EditRecord], formats: dict[str, str]) -> list[list[RowPredictions]]:
    """Per record [T-Loc row, M-Loc row, same-image rows...] (the rows of `evaluate._locality`) under the
    editor's current state: the records' T-Loc rows in one text-only forward, their M-Loc and same-image
    rows in one forward with the images (every image row keeps the M-Loc top-k; the same-image score
    reads its argmax)."""
    backbone = editor.backbone
    per_record = [locality_rows(record, formats) for record in records]
    t_loc = predict_rows(backbone, None, [text[0] for text, _ in per_record], [text[1] for text, _ in per_record], k=1)
    images, prompts, targets = map(list, zip(*[row for _, rows in per_record for row in rows]))
    rows = predict_rows(backbone, images, prompts, targets, k=M_LOC_TOP_K)
    out, start = [], 0
    for text_row, (_, image_rows) in zip(t_loc, per_record, strict=True):
        out.append([text_row, *rows[start:start + len(image_rows)]])
        start += len(image_rows)
    return out


@dataclass
class PreEdit:
    """`pre_edit_locality`'s result: the unedited locality rows of the records scored with ``n_live``
    live, by position (the records left out of the last chunk have none)."""

    n_live: int
    rows: list[list[RowPredictions]]


def pre_edit_locality(editor: Editor, records: Sequence[EditRecord], n_live: int,
                      prompts: dict[str, str] | None = None, progress: bool = False) -> PreEdit:
    """Step 2 of the module docstring: the unedited locality rows of every record scored with ``n_live``
    live, computed in the blocks that step 3 scores them in."""
    formats = prompts or load_prompts()
    editor.restore()
    rows: list[list[RowPredictions]] = []
    for block in tqdm(blocks(len(records), n_live), desc=f"pre-edit outputs, {n_live} live", disable=not progress):
        rows += _locality(editor, [records[p] for p in block], formats)
    return PreEdit(n_live, rows)


def _latency_batch(records: Sequence[EditRecord], n_live: int, edit_format: str) -> tuple[list, list[str]]:
    """The latency measurement's inputs: the edit images and prompts of the first min(4, N) records."""
    rows = records[:min(LATENCY_ROWS, n_live)]
    return [r.load_image("image") for r in rows], [edit_format.format(src=r.src) for r in rows]


def measure_latency(editor: Editor, records: Sequence[EditRecord], n_live: int, task: str = "vqa",
                    prompts: dict[str, str] | None = None) -> dict:
    """The ``latency_ratio`` and ``latency_s`` of `evaluate_sequential` alone: the first ``n_live``
    edits applied, the forward timed, restored (bit-exact on the first edit's prompt, `RestoreError`)."""
    if not editor.lifelong or not 1 <= n_live <= len(records):
        raise ValueError(f"measure_latency: {n_live} live edits of {len(records)} records "
                         f"(lifelong: {editor.lifelong})")
    formats = prompts or load_prompts()
    images, texts = _latency_batch(records, n_live, formats[task])
    editor.restore()
    reference = _probe_logits(editor, (images[0], texts[0]))
    latency = {"unedited_before_s": forward_seconds(editor, images, texts)}
    try:
        for record in records[:n_live]:
            editor.edit(EditRequest.from_record(record, task, formats))
        latency["edited_s"] = forward_seconds(editor, images, texts)
    finally:
        editor.restore()
    latency["unedited_after_s"] = forward_seconds(editor, images, texts)
    if not torch.equal(_probe_logits(editor, (images[0], texts[0])), reference):
        raise RestoreError(f"after restoring {n_live} live edits the first edit's prompt gets other logits "
                           "than the unedited model's")
    return _latency_scores(latency)


def _latency_scores(latency: dict[str, float]) -> dict:
    return {"latency_ratio": latency_ratio(latency["edited_s"], latency["unedited_before_s"],
                                           latency["unedited_after_s"]),
            "latency_s": {k: round(v, 5) for k, v in latency.items()}}


def evaluate_sequential(editor: Editor, records: Sequence[EditRecord], n_live: int, task: str = "vqa",
                        prompts: dict[str, str] | None = None, same_object: SameObject | None = None,
                        pre: PreEdit | None = None, progress: bool = False) -> dict:
    """Score ``records`` in chunks of ``n_live`` edits live at once (module docstring); ``pre``: the
    records' `pre_edit_locality` for ``n_live``, computed here when not given."""
    if not editor.lifelong:
        raise ValueError(f"{type(editor).__name__} holds one edit at a time (Editor.lifelong is False); "
                         "the sequential protocol needs edits that accumulate")
    if n_live < 1:
        raise ValueError(f"n_live must be at least 1, got {n_live}")
    formats = prompts or load_prompts()
    if task not in formats:
        raise ValueError(f"unknown task {task!r}; prompt formats: {', '.join(sorted(formats))}")
    edit_format = formats[task]
    same_object = same_object or WorldSameObject()
    n_chunks = len(records) // n_live
    if n_chunks == 0:
        raise ValueError(f"{len(records)} records cannot fill one chunk of {n_live} live edits")
    if pre is None:
        pre = pre_edit_locality(editor, records, n_live, formats, progress)
    if pre.n_live != n_live or len(pre.rows) != n_chunks * n_live:
        raise ValueError(f"pre-edit predictions cover {len(pre.rows)} records in blocks for {pre.n_live} live, "
                         f"not {n_chunks * n_live} for {n_live}")
    editor.restore()
    first = records[0]
    probe = (first.load_image("image"), edit_format.format(src=first.src))
    reference = _probe_logits(editor, probe)
    timed = _latency_batch(records, n_live, edit_format)
    scores = EditScores(task)
    edit_ms: list[float] = []
    latency: dict[str, float] = {}
    growth = 0.0
    bar = tqdm(total=n_chunks * n_live, desc=f"{n_live} live", disable=not progress)
    by_chunk = blocks(len(records), n_live)
    per_chunk = len(by_chunk) // n_chunks
    for chunk in range(n_chunks):
        positions = range(chunk * n_live, (chunk + 1) * n_live)
        if chunk == 0:
            latency["unedited_before_s"] = forward_seconds(editor, *timed)
        before = resident_mb()
        times = []
        for position in positions:
            start = time.perf_counter()
            editor.edit(EditRequest.from_record(records[position], task, formats))
            times.append(1000.0 * (time.perf_counter() - start))
        try:
            growth = max(growth, resident_mb() - before)
            if chunk == 0:
                latency["edited_s"] = forward_seconds(editor, *timed)
            for block in by_chunk[chunk * per_chunk:(chunk + 1) * per_chunk]:
                block_records = [records[p] for p in block]
                generality = _generality(editor, block_records, edit_format)
                post = _locality(editor, block_records, formats)
                for position, rows, after in zip(block, generality, post, strict=True):
                    record = records[position]
                    novel = (record.truth or {}).get("novel_target")
                    scores.records.append(score_record(record.index, rows, pre.rows[position], after,
                                                       same_object(record), times[position - positions[0]], novel))
                    bar.update()
        finally:
            editor.restore()
        if chunk == 0:
            latency["unedited_after_s"] = forward_seconds(editor, *timed)
        if not torch.equal(_probe_logits(editor, probe), reference):
            raise RestoreError(f"after restoring chunk {chunk} ({n_live} live edits, records "
                               f"{records[positions[0]].index}..{records[positions[-1]].index}) the probe's "
                               "logits differ from the unedited model's")
        edit_ms += times
    bar.close()
    result = scores.to_json()
    result.update(n_live=n_live, n_chunks=n_chunks, n_left_out=len(records) - n_chunks * n_live,
                  edit_ms=round(statistics.fmean(edit_ms), 3), **_latency_scores(latency),
                  rss_growth_mb=round(growth, 2))
    return result
