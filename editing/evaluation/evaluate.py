"""Single-edit evaluation: edit → measure → restore, for every record, with any `Editor`.

    scores = evaluate_edits(editor, load_records("vqa_eval.json"), task="vqa")
    scores.to_json()   # {"rel": 97.5, "t_gen": ..., "m_loc_same_object": ..., "secondary": {...}}

Order of work:
1. ``restore()``; the probe input's logits (default: the first record's image + edit prompt) are kept.
2. Pre-edit T-Loc, M-Loc and same-image predictions for EVERY record, before any edit is applied.
3. Per record: ``edit`` (timed) → Rel, T-Gen, M-Gen in one batch of three rows; T-Loc and M-Loc each
   alone, the same-image questions in one batch → ``restore`` → the probe's logits must be bit-identical
   to step 1 (`RestoreError` if not).

Locality rows run with the same batch composition before and after the edit, so the two runs see the
same shapes and padding and differ only by the edit. Images are opened when needed, never all held.

Same-image locality (``loc_same_image``) asks other questions about the edit's own image (the world's
truth.json lists them per record: `attrib.world.dataset`); records without them (real MMEdit files) leave
the metric out, not at zero.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from attrib.data import DataError, EditRecord
from attrib.parallel import gather, processes
from attrib.prompts import load_prompts
from editing.editor import Editor, EditRequest
from editing.evaluation.metrics import EditScores, RecordScores, RowPredictions, predict_rows, score_record
from editing.evaluation.same_object import WorldSameObject

SameObject = Callable[[EditRecord], "bool | None"]
M_LOC_TOP_K = 10  # EasyEdit's M-Loc compares the top-10 ids


class RestoreError(AssertionError):
    """After ``restore()`` the probe's logits differ from the unedited model's."""


def same_image_questions(record: EditRecord) -> list[dict]:
    """The record's same-image questions ({"question", "answer", ...}); [] where the data has none."""
    return list((record.truth or {}).get("same_image") or [])


def locality_rows(record: EditRecord, formats: dict[str, str]) -> tuple[tuple[str, str], list[tuple]]:
    """A record's locality rows before any forward: the T-Loc (prompt, target), text only, and the rows
    with an image, (image, prompt, target) each: the M-Loc row, then its same-image questions."""
    rows = [(record.load_image("m_loc"), formats["m_loc"].format(m_loc_q=record.m_loc_q), record.m_loc_a)]
    questions = same_image_questions(record)
    if questions:
        image = record.load_image("image")
        rows += [(image, formats["m_loc"].format(m_loc_q=q["question"]), q["answer"]) for q in questions]
    return (formats["loc"].format(loc=record.loc), record.loc_ans), rows


def _locality(editor: Editor, record: EditRecord, formats: dict[str, str]) -> list[RowPredictions]:
    """[T-Loc row (text only), M-Loc row, same-image rows...] predictions under the editor's current state:
    the T-Loc row, the M-Loc row and the same-image rows in three forwards."""
    backbone = editor.backbone
    (loc_prompt, loc_target), (m_loc, *same) = locality_rows(record, formats)
    out = predict_rows(backbone, None, [loc_prompt], [loc_target], k=1)
    out += predict_rows(backbone, [m_loc[0]], [m_loc[1]], [m_loc[2]], k=M_LOC_TOP_K)
    if same:
        images, prompts, targets = map(list, zip(*same))
        out += predict_rows(backbone, images, prompts, targets, k=1)
    return out


def _generality(editor: Editor, record: EditRecord, edit_prompt: str) -> list[RowPredictions]:
    """[Rel, T-Gen, M-Gen] predictions of the new target under the current edit."""
    image = record.load_image("image")
    prompts = [edit_prompt.format(src=record.src), edit_prompt.format(src=record.rephrase),
               edit_prompt.format(src=record.src)]
    return predict_rows(editor.backbone, [image, image, record.load_image("image_rephrase")], prompts,
                        [record.alt] * 3, k=1)


@torch.no_grad()
def _probe_logits(editor: Editor, probe) -> torch.Tensor:
    image, prompt = probe
    backbone = editor.backbone
    return backbone.forward(backbone.encode([image], [prompt]), use_cache=False).logits


def evaluate_edits(editor: Editor, records: Sequence[EditRecord], task: str = "vqa",
                   prompts: dict[str, str] | None = None, same_object: SameObject | None = None,
                   probe: tuple | None = None, skip_bad: bool = False, progress: bool = False) -> EditScores:
    """Evaluate single edits of ``records`` (see the module docstring).

    task: "vqa" or "caption" (which prompt format wraps ``src`` and ``rephrase``); prompts: the prompt
    formats (default: the versioned configuration); same_object: the M-Loc split rule (default:
    `WorldSameObject`, None for non-world data); probe: (image, prompt) checked after every restore;
    skip_bad: skip records whose image or fields cannot be used (counted) instead of stopping.
    """
    formats = prompts or load_prompts()
    if task not in formats:
        raise ValueError(f"unknown task {task!r}; prompt formats: {', '.join(sorted(formats))}")
    edit_format = formats[task]
    same_object = same_object or WorldSameObject()
    scores = EditScores(task)
    editor.restore()

    procs = processes()  # under `accelerate launch` the records are dealt out and the scores gathered
    mine = procs.round_robin(range(len(records)))
    share = f" (process {procs.rank} of {procs.world})" if procs.several else ""
    pre: dict[int, list[RowPredictions]] = {}  # position in ``records`` → pre-edit locality
    skipped: dict[int, str] = {}
    for position in tqdm(mine, desc="pre-edit outputs" + share, disable=not progress):
        record = records[position]
        try:
            pre[position] = _locality(editor, record, formats)
        except (DataError, ValueError) as error:
            if not skip_bad:
                raise
            skipped[position] = f"record {record.index}: {error}"
    kept = [p for p in mine if p in pre]
    scored: dict[int, RecordScores] = {}
    if kept:
        if probe is None:
            first = records[kept[0]]
            probe = (first.load_image("image"), edit_format.format(src=first.src))
        reference = _probe_logits(editor, probe)
    for position in tqdm(kept, desc="edit / measure / restore" + share, disable=not progress):
        record = records[position]
        start = time.perf_counter()
        editor.edit(EditRequest.from_record(record, task, formats))
        edit_ms = 1000.0 * (time.perf_counter() - start)
        try:
            generality = _generality(editor, record, edit_format)
            post = _locality(editor, record, formats)
        finally:
            editor.restore()
        if not torch.equal(_probe_logits(editor, probe), reference):
            raise RestoreError(f"after restoring the edit of record {record.index} the probe's logits differ "
                               "from the unedited model's")
        novel = (record.truth or {}).get("novel_target")
        scored[position] = score_record(record.index, generality, pre[position], post, same_object(record),
                                        edit_ms, novel)
    if procs.several:  # every process's scores, in the records' order
        parts = gather((scored, skipped))
        scored = {p: r for part, _ in parts for p, r in part.items()}
        skipped = {p: line for _, part in parts for p, line in part.items()}
    scores.records = [scored[p] for p in sorted(scored)]
    scores.skipped = [skipped[p] for p in sorted(skipped)]
    scores.n_skipped = len(scores.skipped)
    return scores
