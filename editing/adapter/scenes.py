"""How well scene-level similarity tells an edit's re-rendered image from an unrelated one.

The scene gate (`editing.adapter.scene_gate.SceneGate`) rests on one measurable claim: the chamfer similarity of the
visual states at the edit site is higher between an edit's image and its ``image_rephrase`` (which M-Gen
must keep edited) than between the edit's image and the record's unrelated ``m_loc`` image (which M-Loc
must leave alone). This module measures that on any MMEdit file, untrained, before anything is fitted:

    separation = scene_separation(backbone, load_records("vqa_eval.json"), edit_layer=-1)
    separation.auc["salient"], separation.best_split["salient"]  # also "chamfer", "mean_cosine"

AUC is the probability that a random (image, rephrase) pair scores above a random (image, unrelated)
pair (ties count half); ``best_split`` is the single threshold that keeps the most rephrase pairs above
and unrelated pairs below it, with the two fractions it reaches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from attrib.backbones.loader import Backbone
from attrib.data import EditRecord
from editing.adapter.scene_gate import chamfer_similarity, salient_chamfer
from editing.adapter.split import SplitForward

SIMILARITIES = {
    "chamfer": chamfer_similarity,
    "mean_cosine": lambda a, b: torch.nn.functional.cosine_similarity(a.mean(1), b.mean(1), dim=-1),
}


@dataclass
class SceneSeparation:
    """Per-record similarities [N] of (image, image_rephrase) and (image, m_loc) per similarity name,
    with their AUC and best single threshold; ``edit_layer`` is where the states were read."""

    edit_layer: int
    rephrase: dict[str, torch.Tensor]
    unrelated: dict[str, torch.Tensor]
    auc: dict[str, float] = field(init=False)
    best_split: dict[str, dict[str, float]] = field(init=False)

    def __post_init__(self):
        self.auc = {name: auc(self.rephrase[name], self.unrelated[name]) for name in self.rephrase}
        self.best_split = {name: best_split(self.rephrase[name], self.unrelated[name]) for name in self.rephrase}

    def to_json(self) -> dict:
        return {"edit_layer": self.edit_layer, "n": len(next(iter(self.rephrase.values()))),
                "auc": {k: round(v, 4) for k, v in self.auc.items()}, "best_split": self.best_split,
                "mean": {name: {"rephrase": round(self.rephrase[name].mean().item(), 4),
                                "unrelated": round(self.unrelated[name].mean().item(), 4)} for name in self.rephrase}}


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(positive > negative) over all pairs, ties counting half."""
    diff = positive[:, None] - negative[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def best_split(positive: torch.Tensor, negative: torch.Tensor) -> dict[str, float]:
    """The threshold t maximising (positives ≥ t) + (negatives < t), as fractions."""
    best = None
    for t in torch.cat([positive, negative]).unique():
        kept, cut = (positive >= t).double().mean().item(), (negative < t).double().mean().item()
        if best is None or kept + cut > best["kept"] + best["cut"]:
            best = {"threshold": round(t.item(), 4), "kept": round(kept, 4), "cut": round(cut, 4)}
    return best


@torch.no_grad()
def visual_states(split: SplitForward, image) -> torch.Tensor:
    """[1, P, d] the image's visual-token states at the split's edit site (the prompt does not matter:
    visual tokens come before any text in every supported backbone)."""
    return split.prefix(split.backbone.encode([image], [""])).visual_states().float()


@torch.no_grad()
def reference_states(split: SplitForward, records: Sequence[EditRecord], n: int = 256, batch: int = 16,
                     progress: bool = False) -> torch.Tensor:
    """[P, d] the mean visual-token state per position at the split's edit site over the ``image`` of the
    first ``n`` records (what the salient scene similarity subtracts; `editing.adapter.vead`)."""
    images = [record.load_image("image") for record in records[:n]]
    if not images:
        raise ValueError("no records to take the scene gate's reference states from")
    total = None
    for start in tqdm(range(0, len(images), batch), desc="scene reference", disable=not progress):
        chunk = images[start:start + batch]
        states = split.prefix(split.backbone.encode(chunk, [""] * len(chunk))).visual_states().float().sum(0)
        total = states if total is None else total + states
    return total / len(images)


def scene_separation(backbone: Backbone, records: Sequence[EditRecord], edit_layer: int = -1,
                     progress: bool = True) -> SceneSeparation:
    """Similarities of every record's image to its ``image_rephrase`` and to its ``m_loc`` image; the
    salient similarity's reference is the mean over the same records' images (no labels are read)."""
    split = SplitForward(backbone, edit_layer)
    reference = reference_states(split, records)
    similarities = {**SIMILARITIES, "salient": lambda a, b: salient_chamfer(a, b, reference)}
    rephrase: dict[str, list[float]] = {name: [] for name in similarities}
    unrelated: dict[str, list[float]] = {name: [] for name in similarities}
    for record in tqdm(records, desc="scene similarity", disable=not progress):
        own = visual_states(split, record.load_image("image"))
        again = visual_states(split, record.load_image("image_rephrase"))
        other = visual_states(split, record.load_image("m_loc"))
        for name, similarity in similarities.items():
            rephrase[name].append(similarity(own, again).item())
            unrelated[name].append(similarity(own, other).item())
    as_tensor = lambda values: {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}  # noqa: E731
    return SceneSeparation(edit_layer, as_tensor(rephrase), as_tensor(unrelated))
