"""Which tokens of a target caption an editor gets wrong on E-IC: the edited word or the rest.

An E-IC edit's target caption (``alt``) differs from the image's caption (``pred``) in one attribute
word. Rel scores the target token by token, so an editor can score 93 % and still get under half of the
captions exactly right; this splits its misses, and holds them against the unedited model's own.

Per edit: the Rel row (edit prompt → ``alt``, teacher-forced) is read before and after the edit, in one batch
with the row of the unedited caption ``pred`` both times (same shapes and padding). The tokens of ``alt``
between its longest common prefix and suffix with ``pred`` are the *edited* tokens, the others the *rest*. A
wrong edited token is ``kept_old`` when it is ``pred``'s token there (the edit did not take) and ``other``
otherwise; a wrong rest token is ``new_word`` when it is one of the edited tokens' new ids (the edit spread to
another object) and ``other`` otherwise, and it is counted again in ``rest_wrong_unedited_too`` when the
unedited model got that position wrong as well (the backbone's own captioning error, which an editor that
changes only the edited word keeps). Under a subword tokenizer the old and new word may differ in length
(`edited_span`).

    counts = caption_token_misses(editor, load_records("caption_eval.json"))
    counts.to_json()   # {"exact": 45.0, "edited_right": 64.0, "rest_wrong_unedited_too": ..., ...}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from attrib.data import EditRecord
from attrib.prompts import load_prompts
from editing.editor import Editor, EditRequest
from editing.evaluation.metrics import predict_rows


def edited_span(alt: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] bool: the positions of ``alt`` between its longest common prefix and suffix with ``old``,
    [n] ids: ``old``'s token at the same offset into that span, -1 past its end or outside the span)."""
    n, m = len(alt), len(old)
    prefix = 0
    while prefix < min(n, m) and alt[prefix] == old[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(n, m) - prefix and alt[n - 1 - suffix] == old[m - 1 - suffix]:
        suffix += 1
    edited = torch.zeros(n, dtype=torch.bool)
    edited[prefix:n - suffix] = True
    old_at = torch.full((n,), -1, dtype=alt.dtype)
    width = min(n - suffix, m - suffix) - prefix
    old_at[prefix:prefix + width] = old[prefix:prefix + width]
    return edited, old_at


@dataclass
class CaptionTokens:
    """Token counts of the module docstring over the aligned edits (``n_records``)."""

    n_records: int = 0
    n_tokens: int = 0
    n_edited: int = 0
    exact: int = 0  # edits whose whole target caption is right after the edit
    unedited_rest_right: int = 0  # edits whose rest the unedited model gets right: exact match's ceiling
    edited_kept_old: int = 0
    edited_other: int = 0
    rest_new_word: int = 0
    rest_other: int = 0
    rest_wrong_unedited_too: int = 0
    unedited_rest_wrong: int = 0  # rest tokens the unedited model gets wrong
    miss_records: dict[str, int] = field(default_factory=lambda: {"edited": 0, "rest": 0, "both": 0})

    def add(self, alt: torch.Tensor, old: torch.Tensor, edited_top: torch.Tensor, unedited_top: torch.Tensor) -> None:
        """Count one edit. alt, old: [n], [m] ids of the target and the unedited caption; edited_top,
        unedited_top: [n] argmax ids at the target's positions after / before the edit."""
        edited, old_at = edited_span(alt, old)
        wrong = edited_top != alt
        base_wrong = (unedited_top != alt) & ~edited
        new_ids = torch.unique(alt[edited])
        self.n_records += 1
        self.n_tokens += len(alt)
        self.n_edited += int(edited.sum())
        self.exact += int(not wrong.any())
        self.unedited_rest_right += int(not base_wrong.any())
        self.unedited_rest_wrong += int(base_wrong.sum())
        kept = wrong & edited & (edited_top == old_at)
        self.edited_kept_old += int(kept.sum())
        self.edited_other += int((wrong & edited & ~kept).sum())
        spread = wrong & ~edited & torch.isin(edited_top, new_ids)
        self.rest_new_word += int(spread.sum())
        self.rest_other += int((wrong & ~edited & ~spread).sum())
        self.rest_wrong_unedited_too += int((wrong & base_wrong).sum())
        missed_edit, missed_rest = bool((wrong & edited).any()), bool((wrong & ~edited).any())
        if missed_edit or missed_rest:
            self.miss_records["both" if missed_edit and missed_rest else "edited" if missed_edit else "rest"] += 1

    def to_json(self) -> dict:
        """Counts, and as percentages: exact match, its ceiling for an editor that changes only the
        edited word, the edited tokens right, the rest right after and before the edit."""
        rest = self.n_tokens - self.n_edited

        def pct(part: int, whole: int) -> float | None:
            return round(100.0 * part / whole, 1) if whole else None

        rest_wrong = self.rest_new_word + self.rest_other
        return {"n_records": self.n_records, "n_tokens": self.n_tokens,
                "n_edited_tokens": self.n_edited,
                "exact": pct(self.exact, self.n_records),
                "exact_ceiling_edited_word_only": pct(self.unedited_rest_right, self.n_records),
                "edited_right": pct(self.n_edited - self.edited_kept_old - self.edited_other, self.n_edited),
                "rest_right": pct(rest - rest_wrong, rest),
                "rest_right_unedited": pct(rest - self.unedited_rest_wrong, rest),
                "wrong_tokens": {"edited_kept_old": self.edited_kept_old, "edited_other": self.edited_other,
                                 "rest_new_word": self.rest_new_word, "rest_other": self.rest_other,
                                 "rest_wrong_unedited_too": self.rest_wrong_unedited_too,
                                 "unedited_rest_wrong": self.unedited_rest_wrong},
                "miss_records": dict(self.miss_records)}


@torch.no_grad()
def caption_token_misses(editor: Editor, records: Sequence[EditRecord], prompts: dict[str, str] | None = None,
                         progress: bool = False) -> CaptionTokens:
    """Edit, read the Rel row, restore, for every caption record (module docstring)."""
    formats = prompts or load_prompts()
    counts = CaptionTokens()
    editor.restore()
    for record in tqdm(records, desc="caption tokens", disable=not progress):
        image = record.load_image("image")
        prompt = formats["caption"].format(src=record.src)
        before, old = predict_rows(editor.backbone, [image, image], [prompt, prompt], [record.alt, record.pred])
        editor.edit(EditRequest.from_record(record, "caption", formats))
        try:
            after = predict_rows(editor.backbone, [image, image], [prompt, prompt], [record.alt, record.pred])[0]
        finally:
            editor.restore()
        counts.add(after.labels, old.labels, after.answer_argmax, before.answer_argmax)
    return counts
