"""How a VisEdit edit bank ranks an input's own edit among N live ones: a diagnosis of lifelong routing.

The records are taken in chunks of ``n_live``; each chunk's edits are stored together (as the lifelong
protocol does at N = ``n_live``), and each edit's own image and prompt is run once, reading the [N] scores
the bank ranked the live edits by (`EditBank.last_scores`: the scene router's cosines, the scene gate's
logits, or for the paper's adapter the IM scores). Where the input's own edit does not come first, the
bank routes it elsewhere. The summary splits the scores' variance into what the stored edit explains (its
mean over the chunk's inputs), what the input explains, and the rest, and says how often the chunk's
"loudest" edit (highest mean score) wins an input.

    ranks = routing_ranks(editor, load_records("vqa_eval.json")[:100], n_live=10)
    ranks.to_json()   # {"own_top": 23.0, "own_rank_mean": 3.05, "variance_share": {"edit": 49.2, ...}, ...}
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from attrib.data import EditRecord
from attrib.prompts import load_prompts
from editing.editor import Editor, EditRequest


@dataclass
class RoutingRanks:
    """scores [chunks, n, n]: input i of a chunk (whose own edit is i) against stored edit j;
    families: per chunk, each edit's question family (None where the data does not say)."""

    scores: torch.Tensor
    families: list[list[str | None]]

    def to_json(self) -> dict:
        s = self.scores.double()
        n = s.shape[1]
        own = torch.diagonal(s, dim1=1, dim2=2)  # [chunks, n]
        rank = (s > own[..., None]).sum(2)  # how many edits score above the own one (0: it comes first)
        grand = s.mean((1, 2), keepdim=True)
        by_edit, by_input = s.mean(1, keepdim=True), s.mean(2, keepdim=True)
        total = ((s - grand) ** 2).sum().clamp_min(1e-30)
        share_edit = float(((by_edit - grand) ** 2).sum() * n / total)
        share_input = float(((by_input - grand) ** 2).sum() * n / total)
        loudest = by_edit[:, 0].argmax(1, keepdim=True)  # [chunks, 1]
        others = (s.sum(2) - own) / max(1, n - 1)
        per_family: dict[str, list[float]] = defaultdict(list)
        for chunk, names in zip(s, self.families):
            for j, name in enumerate(names):
                per_family[str(name)].extend(chunk[:, j].tolist())
        return {"n_inputs": int(own.numel()), "n_live": n,
                "own_top": round(100.0 * float((rank == 0).double().mean()), 1),
                "own_rank_mean": round(float(rank.double().mean()), 2),
                "own_score_mean": round(float(own.mean()), 4), "other_score_mean": round(float(others.mean()), 4),
                "variance_share": {"edit": round(100.0 * share_edit, 1), "input": round(100.0 * share_input, 1),
                                   "rest": round(100.0 * (1.0 - share_edit - share_input), 1)},
                "loudest_edit_wins": round(100.0 * float((s.argmax(2) == loudest).double().mean()), 1),
                "score_by_edit_family": {k: round(sum(v) / len(v), 4) for k, v in sorted(per_family.items())}}


@torch.no_grad()
def routing_ranks(editor: Editor, records: Sequence[EditRecord], n_live: int = 10, task: str = "vqa",
                  prompts: dict[str, str] | None = None, progress: bool = False) -> RoutingRanks:
    """The module docstring's scores for the first ``len(records) // n_live`` chunks. ``editor``: a
    lifelong VisEdit editor (its ``hook.bank`` routes the inputs)."""
    bank = getattr(getattr(editor, "hook", None), "bank", None)
    if bank is None or not editor.lifelong:
        raise ValueError(f"routing ranks need a VisEdit editor with an edit bank, not {type(editor).__name__}")
    n_chunks = len(records) // n_live
    if n_chunks == 0:
        raise ValueError(f"{len(records)} records make no chunk of {n_live}")
    formats = prompts or load_prompts()
    backbone = editor.backbone
    chunks, families = [], []
    editor.restore()
    for c in tqdm(range(n_chunks), desc=f"routing ranks, {n_live} live", disable=not progress):
        chunk = records[c * n_live:(c + 1) * n_live]
        try:
            for record in chunk:
                editor.edit(EditRequest.from_record(record, task, formats))
            rows = []
            for record in chunk:
                bank.last_scores = None
                image = record.load_image("image")
                backbone.forward(backbone.encode([image], [formats[task].format(src=record.src)]), use_cache=False)
                if bank.last_scores is None:
                    raise RuntimeError(f"record {record.index}: the forward did not route through the edit bank")
                rows.append(bank.last_scores[0].float().cpu())
        finally:
            editor.restore()
        chunks.append(torch.stack(rows))
        families.append([(record.truth or {}).get("family") for record in chunk])
    return RoutingRanks(torch.stack(chunks), families)
