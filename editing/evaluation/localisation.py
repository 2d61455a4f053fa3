"""IM localisation: where the Influence Mapper opens its gate, scored against the edited object's box.

What it is for: checking that the IM ties each edit to the image region it is about. For an edit of
record r, the IM map is the gate σ(IM) over the visual tokens of r's own input (``image`` + edit
prompt), read from `AdapterHook.last_gate_logits` after one forward under the edit.

    maps = im_maps(editor, eval_records)        # edit → forward → restore, per record
    maps.pointing_game()                        # percent, or None where it does not apply
    maps.gate_means()                           # mean gate on the edit's image vs its unrelated (M-Loc) image
    maps.scene_means()                          # with a scene gate: its mean on re-rendered vs unrelated images
    maps.plot(n=4)                              # overlays (LLaVA) / per-query bars (Q-Former)

Pointing game (as `attrib.validation`): the map's maximum cell lies in the truth box of the asked
object in the input image; tied maxima share the credit. It applies to backbones whose LM visual tokens
form the patch grid (LLaVA: grid_site "lm"; a leading CLS token under the "full" feature strategy is
dropped). Q-Former backbones (BLIP-2, MiniGPT-4) gate query tokens, which have no spatial layout: their
pointing game is None, with a note, and the figure shows the gate per query. Records without a truth
box (count questions, captions, real data) are left out of the score.

Selectivity: the same edit's gate on the record's unrelated M-Loc input (``m_loc`` image and question)
is read too. A gate that is as open there as on the edit's own image leaves locality to the VEAD alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import matplotlib.pyplot as plt
import torch

from attrib.data import EditRecord
from attrib.prompts import load_prompts
from attrib.validation import cells_in_box, pointing_and_mass
from editing.adapter.visedit import VisEditEditor
from editing.editor import EditRequest

QFORMER_NOTE = ("the IM gates Q-Former query tokens, which have no spatial layout: pointing game not "
                "defined (per-query gate values in the figure)")


@dataclass
class ImMaps:
    """gates [N, P] σ(IM) per visual token of each edit's own input; grid (rows, cols) when the tokens
    are the patch grid, else None; boxes: truth box of the asked object per row (None = unknown)."""

    gates: torch.Tensor
    indices: list[int]
    boxes: list
    sizes: list[tuple[int, int]]
    grid: tuple[int, int] | None
    prompts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    images: list = field(default_factory=list, repr=False)
    unrelated: torch.Tensor | None = None  # [N, P] σ(IM) on each record's M-Loc input, under its edit
    scene: dict[str, torch.Tensor] | None = None  # σ(scene gate) [N] per input ("image_rephrase", "m_loc")

    def scene_means(self) -> dict[str, float] | None:
        """Mean scene gate on the edits' re-rendered images and on their unrelated M-Loc images (None
        without a scene gate)."""
        if not self.scene:
            return None
        return {name: round(values.mean().item(), 4) for name, values in self.scene.items() if values.numel()}

    def gate_means(self) -> dict[str, float | None]:
        """Mean σ(IM) over all visual tokens: on the edits' own inputs and on their unrelated M-Loc inputs."""
        mean = lambda t: None if t is None or t.numel() == 0 else round(t.mean().item(), 4)  # noqa: E731
        return {"edit_image": mean(self.gates), "unrelated_image": mean(self.unrelated)}

    @property
    def note(self) -> str | None:
        if self.grid is None:
            return QFORMER_NOTE
        if not any(box is not None for box in self.boxes):
            return "no record has a truth box of the edited object: pointing game not computed"
        return None

    def pointing_game(self) -> float | None:
        """Percent of boxed edits whose IM maximum is in the box (ties share credit); None if not applicable."""
        if self.note is not None:
            return None
        keep = [i for i, box in enumerate(self.boxes) if box is not None]
        inside = torch.stack([cells_in_box(self.grid, self.sizes[i], self.boxes[i]) for i in keep])
        pointing, _ = pointing_and_mass(self.gates[keep][:, None, :], inside)
        return round(100.0 * pointing.mean().item(), 2)

    def plot(self, n: int = 4):
        """IM maps of the first ``n`` edits: σ(IM) over the image with the truth box, or bars per query."""
        n = min(n, len(self.indices), len(self.images) if self.grid is not None else n)
        fig, axes = plt.subplots(1, max(n, 1), figsize=(2.9 * max(n, 1), 3.2), squeeze=False)
        for ax, i in zip(axes[0], range(n)):
            gate = self.gates[i]
            title = f"#{self.indices[i]}: → {self.targets[i][:18]}" if self.targets else f"#{self.indices[i]}"
            if self.grid is None:
                ax.bar(range(len(gate)), gate.numpy(), color="#4c72b0")
                ax.set(xlabel="query token", ylabel="σ(IM)", ylim=(0, 1))
            else:
                width, height = self.sizes[i]
                ax.imshow(self.images[i])
                ax.imshow(gate.reshape(self.grid).numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1,
                          extent=(0, width, height, 0), interpolation="nearest")
                if self.boxes[i] is not None:
                    x0, y0, x1, y1 = self.boxes[i]
                    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=2))
                ax.axis("off")
            ax.set_title(title, fontsize=8)
        fig.suptitle("IM gate σ(IM) on each edit's own image", fontsize=9)
        fig.tight_layout()
        return fig


@torch.no_grad()
def im_maps(editor: VisEditEditor, records: Sequence[EditRecord], task: str = "vqa",
            prompts: dict[str, str] | None = None, limit: int | None = None, keep_images: int = 8) -> ImMaps:
    """IM maps of the edits of ``records`` (at most ``limit``), each read under its own edit; the first
    ``keep_images`` images are kept for `ImMaps.plot`."""
    formats = prompts or load_prompts()
    backbone = editor.backbone
    spatial = backbone.spec.grid_site == "lm"
    grid = backbone.spec.grid_shape(backbone.config) if spatial else None
    gates, unrelated, indices, boxes, sizes, texts, targets, images = [], [], [], [], [], [], [], []
    scene: dict[str, list[torch.Tensor]] = {"image_rephrase": [], "m_loc": []}

    def forward(image, prompt: str) -> None:
        backbone.forward(backbone.encode([image], [prompt]), use_cache=False)

    def gate(image, prompt: str, scene_of: str | None = None) -> torch.Tensor:
        forward(image, prompt)
        if scene_of is not None and editor.hook.last_scene_logits is not None:
            scene[scene_of].append(torch.sigmoid(editor.hook.last_scene_logits[0].float().cpu()))
        logits = editor.hook.last_gate_logits[0].float().cpu()
        if grid is not None and logits.numel() == grid[0] * grid[1] + 1:
            logits = logits[1:]  # "full" feature strategy: the CLS token comes first
        return torch.sigmoid(logits)

    for record in list(records)[:limit]:
        request = EditRequest.from_record(record, task, formats)
        editor.edit(request)
        try:
            gates.append(gate(request.image, request.prompt))
            unrelated.append(gate(record.load_image("m_loc"), formats["m_loc"].format(m_loc_q=record.m_loc_q),
                                  "m_loc"))
            if editor.adapter.scene is not None:
                forward(record.load_image("image_rephrase"), request.prompt)
                scene["image_rephrase"].append(torch.sigmoid(editor.hook.last_scene_logits[0].float().cpu()))
        finally:
            editor.restore()
        indices.append(record.index)
        boxes.append(record.box("image"))
        sizes.append(request.image.size)
        texts.append(request.prompt)
        targets.append(request.target)
        if len(images) < keep_images:
            images.append(request.image)
    stack = lambda rows: torch.stack(rows) if rows else torch.zeros(0, backbone.n_visual_tokens)  # noqa: E731
    scenes = {name: torch.stack(values) for name, values in scene.items() if values} or None
    return ImMaps(stack(gates), indices, boxes, sizes, grid, texts, targets, images, stack(unrelated), scenes)
