"""``lookup``: a control, not an editor. It answers the edit's target whenever the input's image is the edit
image by the scene gate's own similarity, and leaves every other input alone.

The similarity is the salient chamfer similarity of the LM-input visual states (`editing.adapter.
scene_gate`), its reference the mean state over training images; the threshold is the one that best
separates, on dev records, each edit image's re-rendered twin (``image_rephrase``) from its unrelated M-Loc
image (`editing.adapter.scenes.best_split`). A matched row's logits are replaced, from the position after
its prompt on, by the edit target's tokens — whatever was asked. MMEdit's five metrics can score such a
table as well as an editor (its M-Loc images are unrelated to the edit); same-image locality and novel
targets are where a real editor has to do better. Text-only inputs are never touched (``text_edits``).

The table holds every edit made since the last ``restore()`` (``lifelong = True``): each input row is
compared with every stored edit image at once (one batched similarity, [rows, edits]) and takes the
target of the most similar one if that similarity reaches the threshold. When two stored edits share
the image (equal similarity), the latest edit wins.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from attrib.answers import target_token_ids
from attrib.backbones.loader import Backbone
from attrib.data import EditRecord
from editing.adapter.scene_gate import salient_chamfer
from editing.adapter.scenes import best_split, reference_states, visual_states
from editing.adapter.split import LM_INPUT, SplitForward
from editing.editor import Editor, EditRequest
from editing.methods import MethodContext

FORCED_LOGIT = 1e4  # added to a forced token's logit: far above any real logit gap


class LookupBackbone(Backbone):
    """The backbone with a lookup table in front: `encode` notes each row's target length, `forward`
    overwrites the answer logits of rows whose image matches the stored edit image.

    The note is kept with the ``input_ids`` tensor it belongs to and `forward` uses it only for that very
    tensor (identity, not storage address: a freed batch's memory is handed to the next one, and a batch
    encoded without targets must not read another batch's lengths)."""

    def bind(self, table: "Lookup") -> "LookupBackbone":
        self.table, self.notes = table, {}
        return self

    def encode(self, images, prompts, targets=None):
        inputs = super().encode(images, prompts, targets)
        if targets is not None:
            lengths = [len(target_token_ids(self, p, t, images is not None)) for p, t in zip(prompts, targets)]
            self.notes = {"ids": inputs["input_ids"], "lengths": lengths}
        return inputs

    def forward(self, inputs, **kwargs):
        out = super().forward(inputs, **kwargs)
        table = self.table
        if not table.stored or inputs.get("pixel_values") is None:
            return out
        matched = table.matches(inputs)  # [B] entry or -1
        length = inputs["input_ids"].shape[1]
        noted = self.notes.get("ids") is inputs["input_ids"]
        for row in (matched >= 0).nonzero().flatten().tolist():
            answer = self.notes["lengths"][row] if noted else 0
            start = length - answer - 1  # the position that predicts the first answer token
            ids = table.stored[int(matched[row])]["ids"][: max(1, answer)]
            positions = torch.arange(start, start + len(ids))
            out.logits[row, positions, ids] += FORCED_LOGIT
        return out


class Lookup(Editor):
    """The control of the module docstring."""

    text_edits = False
    lifelong = True

    def __init__(self, context: MethodContext):
        base = context.backbone
        self.base = base
        self.backbone = LookupBackbone(base.model, base.processor, base.spec, base.path, base.prompt_template,
                                       base.text_template, base.manifest).bind(self)
        self.split = SplitForward(base, LM_INPUT)
        self.hyper = context.hyper
        self.reference: torch.Tensor | None = None
        self.threshold: float | None = None
        self.stored: list[dict] = []  # per edit, in edit order: its image's states [1, P, d] and target ids

    def prepare(self, train: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        """Reference states from training images; the threshold from dev pairs (module docstring)."""
        start = time.perf_counter()
        self.reference = reference_states(self.split, train, n=int(self.hyper.get("reference_images", 256)))
        twins, unrelated = [], []
        for record in dev[: int(self.hyper.get("dev_records", 100))]:
            own = visual_states(self.split, record.load_image("image"))
            twins.append(self._similarity(own, visual_states(self.split, record.load_image("image_rephrase"))))
            unrelated.append(self._similarity(own, visual_states(self.split, record.load_image("m_loc"))))
        split = best_split(torch.cat(twins).double(), torch.cat(unrelated).double())
        self.threshold = split["threshold"]
        return {"wall_s": round(time.perf_counter() - start, 2), "dev_split": split, "n_dev": len(twins)}

    def _similarity(self, states: torch.Tensor, edit_states: torch.Tensor) -> torch.Tensor:
        return salient_chamfer(states, edit_states.expand(len(states), -1, -1), self.reference)

    @torch.no_grad()
    def matches(self, inputs) -> torch.Tensor:
        """LongTensor [B]: per row, the stored edit whose image it is (the most similar one at or above the
        threshold, the latest among equals), or -1."""
        states = self.split.prefix(inputs).visual_states().float()  # [B, P, d]
        table = torch.cat([entry["states"] for entry in self.stored])  # [N, P, d]
        rows, edits = len(states), len(table)
        similarity = self._similarity(states.repeat_interleave(edits, 0), table.repeat(rows, 1, 1))
        similarity = similarity.view(rows, edits)  # [B, N]
        best, last = similarity.flip(-1).max(-1)  # max takes the first of equal maxima: the latest edit
        entry = edits - 1 - last
        return torch.where(best >= self.threshold, entry, torch.full_like(entry, -1))

    @torch.no_grad()
    def edit(self, request: EditRequest) -> None:
        if self.threshold is None:
            raise RuntimeError("lookup: prepare(train, dev) sets the threshold before any edit")
        ids = target_token_ids(self.base, request.prompt, request.target, True)
        self.stored.append({"states": visual_states(self.split, request.image), "ids": torch.as_tensor(ids)})

    def restore(self) -> None:
        self.stored = []


def build(context: MethodContext) -> Lookup:
    return Lookup(context)
