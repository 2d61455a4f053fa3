"""Editing metrics: teacher-forced predictions, per-record scores and their summary.

All inputs are teacher-forced rows ``template(prompt) + " " + target``; only the target positions are
scored (the logits one position before each target token).

- Rel / T-Gen / M-Gen: token accuracy (mean over target tokens of argmax == label, then mean over
  records) and exact match (every target token right).
- T-Loc / M-Loc, VisEdit protocol (primary): the fraction of answer positions (``loc_ans`` /
  ``m_loc_a``) whose post-edit argmax equals the pre-edit argmax.
- Same-image locality (``loc_same_image``, beside the five, not in their mean): the same agreement on
  other questions about the edit's own image, per record the mean over its questions.
- Novel targets: Rel / T-Gen / M-Gen also reported over the edits whose target is a word the model never
  produced (``novel``) and over the rest (``known``), where the data marks them.
- T-Loc / M-Loc, EasyEdit protocol (secondary, labelled): over every real position of the row, top-1
  (T-Loc) or the top-10 ids compared rank by rank (M-Loc), as EasyEdit's multimodal trainer does; where an
  edit lengthens the row (IKE's context), over the unedited row's positions, the post-edit row's suffix.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from attrib.backbones.loader import Backbone
from editing.inputs import teacher_forced_batch

EASYEDIT_PROTOCOL = ("EasyEdit: post- vs pre-edit top-k token ids over the whole teacher-forced sequence, "
                     "compared rank by rank; k = 1 for T-Loc, k = 10 for M-Loc")
VISEDIT_PROTOCOL = "VisEdit: post- vs pre-edit argmax agreement on the answer positions"


def token_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of target tokens predicted right. predicted, labels: [n] token ids."""
    return (predicted == labels).float().mean().item()


def exact_match(predicted: torch.Tensor, labels: torch.Tensor) -> bool:
    """Every target token right. predicted, labels: [n]."""
    return bool((predicted == labels).all())


def suffix_agreement(pre: torch.Tensor, post: torch.Tensor) -> float:
    """`agreement` of the last min(len) rows of two [T, k] id lists: a method that writes text in front of
    the prompt (IKE) makes the post-edit row longer, and the unedited row is its suffix (rows are
    left-padded, the context goes first)."""
    n = min(len(pre), len(post))
    return agreement(pre[len(pre) - n:], post[len(post) - n:])


def agreement(pre: torch.Tensor, post: torch.Tensor) -> float:
    """Fraction of equal entries of two id tensors of one shape ([n] argmaxes or [T, k] top-k lists)."""
    if pre.shape != post.shape:
        raise ValueError(f"pre-edit ids {tuple(pre.shape)} and post-edit ids {tuple(post.shape)} differ in shape")
    return (pre == post).float().mean().item()


@dataclass
class RowPredictions:
    """What one teacher-forced row predicts.

    labels: [n] target ids; answer_top: [n, k] top-k ids at the positions predicting them;
    sequence_top: [T_b, k] top-k ids at every real (non-padding) position of the row.
    """

    labels: torch.Tensor
    answer_top: torch.Tensor
    sequence_top: torch.Tensor

    @property
    def answer_argmax(self) -> torch.Tensor:
        return self.answer_top[:, 0]


def top_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[..., V] → int32 [..., k]: ids of the k largest logits, best first (int32: the pre-edit cache
    holds these for every record)."""
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices.to(torch.int32)


@torch.no_grad()
def predict_rows(backbone: Backbone, images: Sequence[Image.Image] | None, prompts: Sequence[str],
                 targets: Sequence[str], k: int = 1) -> list[RowPredictions]:
    """One forward of the rows (through the backbone, so an installed edit applies) → per-row predictions."""
    batch = teacher_forced_batch(backbone, images, prompts, targets)
    logits = backbone.forward(batch.inputs, use_cache=False).logits  # [B, T, V]
    return [RowPredictions(batch.labels(row).to(torch.int32).cpu(),
                           top_ids(batch.answer_logits(logits, row).float(), k).cpu(),
                           top_ids(batch.sequence_logits(logits, row).float(), k).cpu())
            for row in range(len(prompts))]


@dataclass
class RecordScores:
    """Scores of one edit (fractions in [0, 1]). same_object: does the M-Loc image contain the edited
    object (None = unknown / not applicable)."""

    index: int
    rel: float
    rel_em: bool
    t_gen: float
    t_gen_em: bool
    m_gen: float
    m_gen_em: bool
    t_loc: float
    m_loc: float
    t_loc_top1: float
    m_loc_top10: float
    same_object: bool | None = None
    edit_ms: float = 0.0
    loc_same_image: float | None = None
    novel: bool | None = None


def score_record(index: int, generality: Sequence[RowPredictions], pre_loc: Sequence[RowPredictions],
                 post_loc: Sequence[RowPredictions], same_object: bool | None = None,
                 edit_ms: float = 0.0, novel: bool | None = None) -> RecordScores:
    """Scores from post-edit (rel, t_gen, m_gen) predictions and pre/post locality predictions
    ([t_loc, m_loc, same-image rows...])."""
    rel, t_gen, m_gen = generality
    (pre_t, pre_m, *pre_same), (post_t, post_m, *post_same) = pre_loc, post_loc
    same_image = None
    if pre_same:
        same_image = float(np.mean([agreement(a.answer_argmax, b.answer_argmax)
                                    for a, b in zip(pre_same, post_same, strict=True)]))
    return RecordScores(
        index,
        token_accuracy(rel.answer_argmax, rel.labels), exact_match(rel.answer_argmax, rel.labels),
        token_accuracy(t_gen.answer_argmax, t_gen.labels), exact_match(t_gen.answer_argmax, t_gen.labels),
        token_accuracy(m_gen.answer_argmax, m_gen.labels), exact_match(m_gen.answer_argmax, m_gen.labels),
        agreement(pre_t.answer_argmax, post_t.answer_argmax), agreement(pre_m.answer_argmax, post_m.answer_argmax),
        suffix_agreement(pre_t.sequence_top[:, :1], post_t.sequence_top[:, :1]),
        suffix_agreement(pre_m.sequence_top[:, :10], post_m.sequence_top[:, :10]),
        same_object, edit_ms, same_image, novel,
    )


def _percent(values: Sequence[float | bool]) -> float | None:
    return round(100.0 * float(np.mean(values)), 2) if len(values) else None


@dataclass
class EditScores:
    """Single-edit evaluation of a set of records; `to_json` gives percentages."""

    task: str
    records: list[RecordScores] = field(default_factory=list)
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # one line per skipped record

    def mean(self, name: str, subset: Sequence[RecordScores] | None = None) -> float | None:
        """Percentage mean of one RecordScores field over the records (or ``subset``)."""
        rows = self.records if subset is None else subset
        return _percent([getattr(r, name) for r in rows])

    def generality(self, subset: Sequence[RecordScores]) -> dict:
        """Rel / T-Gen / M-Gen (token accuracy and exact match, percent) over ``subset``."""
        out: dict = {"n": len(subset)}
        for name in ("rel", "t_gen", "m_gen"):
            out[name] = self.mean(name, subset)
            out[f"{name}_em"] = self.mean(f"{name}_em", subset)
        return out

    def to_json(self) -> dict:
        """``rel`` … ``m_loc`` in percent (VisEdit protocol), exact match, the same-object split of
        M-Loc, same-image locality, the novel / known target split, the EasyEdit numbers under
        ``secondary``, and the mean edit time."""
        same = [r for r in self.records if r.same_object is True]
        other = [r for r in self.records if r.same_object is False]
        times = [r.edit_ms for r in self.records]
        with_same_image = [r for r in self.records if r.loc_same_image is not None]
        novel = [r for r in self.records if r.novel is True]
        known = [r for r in self.records if r.novel is False]
        return {
            "task": self.task,
            "n_eval": len(self.records),
            "n_skipped": self.n_skipped,
            "protocol": VISEDIT_PROTOCOL,
            **{name: self.mean(name) for name in ("rel", "t_gen", "m_gen", "t_loc", "m_loc")},
            "exact_match": {name: self.mean(f"{name}_em") for name in ("rel", "t_gen", "m_gen")},
            "m_loc_same_object": self.mean("m_loc", same),
            "m_loc_other": self.mean("m_loc", other),
            "n_same_object": len(same),
            "n_other": len(other),
            "loc_same_image": self.mean("loc_same_image", with_same_image),
            "n_same_image": len(with_same_image),
            "targets": {"novel": self.generality(novel), "known": self.generality(known)} if novel or known else None,
            "secondary": {"protocol": EASYEDIT_PROTOCOL, "t_loc_top1": self.mean("t_loc_top1"),
                          "m_loc_top10": self.mean("m_loc_top10")},
            "edit_ms": round(float(np.mean(times)), 3) if times else None,
        }

    def per_record(self) -> list[dict]:
        return [asdict(r) for r in self.records]
