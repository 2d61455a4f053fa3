"""Ground-truth validation of region attribution: does the map point at the object the question is about?

What it is for: on the synthetic world (SPEC §8) every VQA record knows the pixel box of the asked-about
object, so a region method can be scored, per layer, against the truth and against standard baselines.

    backbone = load_backbone("llava", path)
    records = load_records("runs/world/vqa_eval.json", n=24)
    result = validate(backbone, records, AttributionConfig())
    write_validation(result, "figures/llava")        # validation.json, validation.png, validation.md

Scores (percent, mean over samples). A map's region c is drawn at its own grid cell (row-major), whose
pixel rectangle is image_size / grid side wide; a cell is *in the box* when its centre lies inside it.
- pointing game: the maximum cell is in the box. Tied maxima share the credit, so a flat map scores
  exactly the random-cell baseline instead of whatever cell 0 happens to be.
- mass in box: share of the map's mass, negatives clipped to 0, on cells in the box (flat if no mass).
- best_layers: the contiguous band of up to 3 layers with the highest mean pointing game. It is chosen on
  the scored samples themselves, so it is optimistic; per-layer curves are in the JSON.
- per_family: both scores at the best band split by the world's question family (``truth["family"]``), so
  a method that misses one kind of question (LLaVA's layers 5-7 look at the same-shape object of another
  colour on some existence questions) is told apart from one that misses at random.

Methods: every region method of the backbone at the configured window, and the primary noise method
(attention_noise / vit_noise) once more on single cells as ``<name>_cell`` when that window is wider;
Q-Former backbones also get the ViT noise's other read on single cells as ``vit_noise_<read>_cell``
(``vit_noise_propagated_cell`` with the default read; see `attrib.regions.propagated`), and
``query_noise_patches``: VisEdit's noise on each LM query token (the per-query view) spread over the ViT
patches by the Q-Former's cross-attention, the composition the raw-attention baseline uses
(`through_cross_attention`), so the two differ only in what the LM side measures.

Baselines, scored the same way:
- integrated_gradients: captum IG on ``pixel_values`` (zero baseline = the processor's mean image) for the
  key-token logit at the last position; |attr| summed over channels and over each patch cell.
- layer_integrated_gradients: captum LIG, per-token attribution summed over the hidden size (signed):
  on the projector output for "lm" backbones (its tokens are the LM visual tokens in grid order), on the
  ViT's last encoder layer for Q-Former backbones (their LM tokens are not spatial).
- raw_attention: the last token's head-mean attention per LM layer; LLaVA: to the visual tokens; Q-Former
  backbones: to the query tokens, composed with the head- and layer-mean Q-Former cross-attention from
  queries to ViT patches.
- random_cell: expected pointing game of a uniformly random cell = mean of (cells in box / all cells).
- random_object: expected score of picking one of the scene's objects at random = mean of 1 / n_objects,
  objects counted from the image (`count_objects`).

Gotchas: the key token is the model's own top-1 next token (as in every region method); with
``correct_only`` it is the true answer's first token. Grid geometry assumes square images (the world's),
which the processors resize without cropping.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients
from PIL import Image

from attrib.attribution import AttributionConfig, _atomic, _writable, region_methods, sweep_plan
from attrib.backbones.loader import Backbone
from attrib.prompts import load_prompts
from attrib.regions.capture import capture_layers, last_query_attention
from attrib.regions.propagated import VIT_READS, VitNoise
from attrib.regions.regions import grid_windows
from attrib.regions.result import RegionResult
from attrib.regions.sweep import region_sweep

BAND = 3  # widest layer band reported as best
Size = tuple[int, int]  # (width, height) px


# ---- scoring ---------------------------------------------------------------------------------------------

def cells_in_box(shape: tuple[int, int], size: Size, box: Sequence[float]) -> torch.Tensor:
    """BoolTensor [rows*cols]: cell centres (row-major) inside ``box`` [x0, y0, x1, y1) of a ``size`` image."""
    rows, cols = shape
    width, height = size
    x = (torch.arange(cols) + 0.5) * width / cols
    y = (torch.arange(rows) + 0.5) * height / rows
    inside_x = (x >= box[0]) & (x < box[2])
    inside_y = (y >= box[1]) & (y < box[3])
    return (inside_y[:, None] & inside_x[None, :]).flatten()


def pointing_and_mass(maps: torch.Tensor, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample scores in [0, 1]: maps [N, L, C], inside [N, C] → (pointing [N, L], mass [N, L])."""
    maps = maps.double()
    inside = inside[:, None, :].double()
    top = (maps == maps.amax(-1, keepdim=True)).double()  # tied maxima share the credit
    pointing = (top * inside).sum(-1) / top.sum(-1)
    mass = maps.clamp(min=0)
    flat = mass.sum(-1, keepdim=True) == 0
    mass = torch.where(flat, torch.ones_like(mass), mass)  # no mass anywhere: spread it evenly
    return pointing, (mass * inside).sum(-1) / mass.sum(-1)


def _sizes(image_size: int | Size | Sequence[Size], n: int) -> list[Size]:
    if isinstance(image_size, int):
        return [(image_size, image_size)] * n
    if len(image_size) == 2 and all(isinstance(v, int) for v in image_size):
        return [tuple(image_size)] * n  # type: ignore[list-item]
    return [tuple(s) for s in image_size]  # type: ignore[union-attr]


def score_maps(result: RegionResult, records: Sequence, image_size: int | Size | Sequence[Size]) -> dict:
    """Pointing game and mass in box (percent) per layer of ``result`` against the records' image boxes.

    Row n of ``result.maps`` [N, L, C] belongs to ``records[n]`` (extra records are ignored); rows whose
    record has no box are left out. ``image_size``: one side, one (w, h), or one (w, h) per record.
    Returns {"layers", "pointing_game" [L], "mass_in_box" [L], "n_samples", "per_sample": {"pointing_game" and
    "mass_in_box" [n, L] in [0, 1], "family" and "question" [n]}}.
    """
    rows, cols = result.regions.shape
    if rows * cols != result.maps.shape[-1] or rows < 2:
        raise ValueError(f"{result.method}: regions {result.regions.name!r} are not a spatial grid")
    n = result.maps.shape[0]
    sizes = _sizes(image_size, len(records))
    keep = [i for i in range(n) if records[i].box("image") is not None]
    if not keep:
        raise ValueError(f"{result.method}: none of the {n} samples has a ground-truth box")
    inside = torch.stack([cells_in_box((rows, cols), sizes[i], records[i].box("image")) for i in keep])
    pointing, mass = pointing_and_mass(result.maps[keep], inside)
    return {"layers": list(result.layers), "pointing_game": (100 * pointing.mean(0)).tolist(),
            "mass_in_box": (100 * mass.mean(0)).tolist(), "n_samples": len(keep),
            "per_sample": {"pointing_game": pointing, "mass_in_box": mass,
                           "family": [_family(records[i]) for i in keep],
                           "question": [getattr(records[i], "src", None) or f"record {i}" for i in keep]}}


def _family(record) -> str:
    """The question family the world's truth names for ``record`` ("unknown" without one)."""
    truth = getattr(record, "truth", None) or {}
    return truth.get("family") or "unknown"


def per_family(scores: dict, layers: slice | None = None) -> dict[str, dict]:
    """Pointing game and mass in box (percent) per question family, on the layers ``layers`` selects (their
    mean, as the best band's scores are): {family: {"n", "pointing_game", "mass_in_box"}}, families sorted."""
    samples = scores["per_sample"]
    pointing, mass = samples["pointing_game"], samples["mass_in_box"]
    if layers is not None:
        pointing, mass = pointing[:, layers], mass[:, layers]
    pointing, mass = pointing.float().mean(1), mass.float().mean(1)
    out = {}
    for family in sorted(set(samples["family"])):
        rows = torch.tensor([f == family for f in samples["family"]])
        out[family] = {"n": int(rows.sum()), "pointing_game": 100 * float(pointing[rows].mean()),
                       "mass_in_box": 100 * float(mass[rows].mean())}
    return out


def best_band(values: Sequence[float], width: int = BAND) -> tuple[int, int]:
    """[start, stop) of the contiguous run of min(width, len) values with the highest mean (earliest on ties)."""
    width = min(width, len(values))
    means = [float(np.mean(values[i:i + width])) for i in range(len(values) - width + 1)]
    start = int(np.argmax(means))
    return start, start + width


def summarise(scores: dict) -> dict:
    """A method's entry: per-layer lists (a float for layer-less maps), best band and its scores, and each
    question's pointing game (percent, the band's mean) beside its text, in sample order."""
    layers, pointing, mass = scores["layers"], scores["pointing_game"], scores["mass_in_box"]
    samples = scores["per_sample"]
    lo, hi = (0, 1) if layers == [-1] else best_band(pointing)
    per_question = {"question": list(samples["question"]), "family": list(samples["family"]),
                    "pointing_game": (100 * samples["pointing_game"][:, lo:hi].double().mean(1)).tolist()}
    if layers == [-1]:  # one map read at the output: no layer axis to choose from
        return {"layers": [], "pointing_game": pointing[0], "mass_in_box": mass[0], "best_layers": [],
                "best_pointing_game": pointing[0], "best_mass_in_box": mass[0], "n_samples": scores["n_samples"],
                "per_family": per_family(scores), "per_question": per_question}
    return {"layers": layers, "pointing_game": pointing, "mass_in_box": mass, "best_layers": layers[lo:hi],
            "best_pointing_game": float(np.mean(pointing[lo:hi])), "best_mass_in_box": float(np.mean(mass[lo:hi])),
            "n_samples": scores["n_samples"], "per_family": per_family(scores, slice(lo, hi)),
            "per_question": per_question}


# ---- random baselines ------------------------------------------------------------------------------------

def count_objects(image: Image.Image, cell_px: int = 8, min_chroma: int = 60, min_fraction: float = 0.05) -> int:
    """Coloured blobs on a ``cell_px`` grid: the world's objects on its low-saturation grey background.

    A pixel is coloured when max(RGB) − min(RGB) > ``min_chroma`` (background ≲ 25, palette ≳ 100); a cell
    is coloured when at least ``min_fraction`` of its pixels are; objects = 8-connected groups of coloured
    cells. The world keeps one empty patch between objects, so distinct objects never touch.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    rows, cols = rgb.shape[0] // cell_px, rgb.shape[1] // cell_px
    chroma = (rgb.max(-1) - rgb.min(-1))[:rows * cell_px, :cols * cell_px] > min_chroma
    coloured = chroma.reshape(rows, cell_px, cols, cell_px).mean((1, 3)) >= min_fraction
    seen = np.zeros_like(coloured)
    count = 0
    for start in zip(*np.nonzero(coloured)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            r, c = stack.pop()
            for rr in range(max(0, r - 1), min(rows, r + 2)):
                for cc in range(max(0, c - 1), min(cols, c + 2)):
                    if coloured[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
    return count


def random_baselines(records: Sequence, images: Sequence[Image.Image], shape: tuple[int, int]) -> dict[str, float]:
    """{"random_cell", "random_object"} in percent (see the module docstring)."""
    cells = [cells_in_box(shape, im.size, r.box("image")).double().mean().item() for r, im in zip(records, images)]
    objects = [1 / max(1, count_objects(im)) for im in images]
    return {"random_cell": 100 * float(np.mean(cells)), "random_object": 100 * float(np.mean(objects))}


# ---- gradient and attention baselines --------------------------------------------------------------------

def _encoded(backbone: Backbone, images, prompts):
    """Encoded batch on the model's device, pixels in the model's dtype."""
    param = next(backbone.model.parameters())
    inputs = backbone.encode(images, prompts).to(param.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


def _inputs(backbone: Backbone, images, prompts):
    """`_encoded` and the key tokens [B] (the model's own top-1 next token)."""
    inputs = _encoded(backbone, images, prompts)
    with torch.no_grad():
        keys = backbone.forward(inputs).logits[:, -1].argmax(-1)
    return inputs, keys


def _key_logits(model: torch.nn.Module):
    """forward(pixel_values, input_ids, attention_mask) → last-position logits [B, V]: the text stays bound
    so captum varies the image only (SPEC §3: unbound LLM wrappers silently drop the pixels)."""
    def forward(pixel_values, input_ids, attention_mask):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        return logits[:, -1].float()
    return forward


def _grid_result(backbone: Backbone, maps: torch.Tensor, layers: list[int], name: str, meta: dict) -> RegionResult:
    rows, cols = backbone.spec.grid_shape(backbone.config)
    return RegionResult(maps.detach().float().cpu(), layers, grid_windows(rows, cols, 0, backbone.spec.grid_site),
                        name, {**meta, "backbone": backbone.spec.name})


def integrated_gradients_maps(backbone: Backbone, images, prompts: Sequence[str], steps: int = 16,
                              batch_size: int = 8) -> RegionResult:
    """captum IG on pixel_values → maps [N, 1, rows*cols]: |attr| summed over channels and patch cells."""
    rows, cols = backbone.spec.grid_shape(backbone.config)
    ig = IntegratedGradients(_key_logits(backbone.model))
    out = []
    for lo in range(0, len(prompts), batch_size):
        inputs, keys = _inputs(backbone, images[lo:lo + batch_size], prompts[lo:lo + batch_size])
        pixels = inputs["pixel_values"]  # [B, 3, S, S]
        attr = ig.attribute(pixels, baselines=torch.zeros_like(pixels), target=keys, n_steps=steps,
                            additional_forward_args=(inputs["input_ids"], inputs["attention_mask"]),
                            internal_batch_size=batch_size)
        b, _, h, w = attr.shape
        cells = attr.abs().sum(1).reshape(b, rows, h // rows, cols, w // cols).sum((2, 4))
        out.append(cells.reshape(b, 1, rows * cols))
    return _grid_result(backbone, torch.cat(out), [-1], "integrated_gradients",
                        {"method": {"name": "integrated_gradients", "n_steps": steps, "baseline": "zeros",
                                    "aggregate": "|attr| summed over channels and patch cells"}})


def lig_layer(backbone: Backbone) -> tuple[str, torch.nn.Module]:
    """Where LIG attributes: the projector ("lm" grid) or the ViT's last encoder layer ("vit" grid).

    The ViT's own output is a ModelOutput and its post-LayerNorm runs twice (patches, then pooled CLS),
    both of which break captum's layer hook; the last encoder layer returns the patch tensor once, and the
    post-LayerNorm after it acts token by token, so per-patch attributions keep their meaning.
    """
    if backbone.spec.grid_site == "lm":
        return backbone.spec.bridge[-1], backbone.module(backbone.spec.bridge[-1])
    tower = backbone.module(backbone.spec.vision_tower)
    for name, module in tower.named_modules():
        if name.endswith("encoder.layers"):
            return f"{backbone.spec.vision_tower}.{name}.{len(module) - 1}", module[-1]
    raise ValueError(f"{backbone.spec.name}: no encoder.layers in the vision tower {backbone.spec.vision_tower!r}")


def layer_integrated_gradients_maps(backbone: Backbone, images, prompts: Sequence[str], steps: int = 16,
                                    batch_size: int = 8) -> RegionResult:
    """captum LIG → maps [N, 1, rows*cols]: per-token attribution (summed over the hidden size) of the
    spatial tokens at `lig_layer`, CLS dropped (the grid's tokens are the last rows*cols)."""
    rows, cols = backbone.spec.grid_shape(backbone.config)
    path, layer = lig_layer(backbone)
    lig = LayerIntegratedGradients(_key_logits(backbone.model), layer)
    out = []
    for lo in range(0, len(prompts), batch_size):
        inputs, keys = _inputs(backbone, images[lo:lo + batch_size], prompts[lo:lo + batch_size])
        pixels = inputs["pixel_values"]
        attr = lig.attribute(pixels, baselines=torch.zeros_like(pixels), target=keys, n_steps=steps,
                             additional_forward_args=(inputs["input_ids"], inputs["attention_mask"]),
                             internal_batch_size=batch_size)  # [B, tokens, D]
        out.append(attr.sum(-1)[:, -rows * cols:].unsqueeze(1))
    return _grid_result(backbone, torch.cat(out), [-1], "layer_integrated_gradients",
                        {"method": {"name": "layer_integrated_gradients", "layer": path, "n_steps": steps,
                                    "baseline": "zeros (pixel_values)", "aggregate": "sum over hidden size"}})


@torch.no_grad()
def _cross_attention(backbone: Backbone, inputs) -> torch.Tensor:
    """Q-Former cross-attention [B, queries, ViT tokens], mean over heads and cross-attention layers.

    sdpa returns no weights, so the Q-Former runs eagerly for this pass; a cross-attention call is the one
    whose kwargs carry ``encoder_hidden_states`` and whose output is (out, weights).
    """
    qformer = backbone.module(backbone.spec.bridge[0])
    previous = qformer.config._attn_implementation
    weights = []

    def keep(module, args, kwargs, output):
        if kwargs.get("encoder_hidden_states") is not None and isinstance(output, tuple) and output[1] is not None:
            weights.append(output[1].mean(1).float())  # [B, Q, S]

    hooks = [m.register_forward_hook(keep, with_kwargs=True) for m in qformer.modules()]
    try:
        qformer.set_attn_implementation("eager")
        backbone.forward(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        qformer.set_attn_implementation(previous)
    return torch.stack(weights).mean(0)


def through_cross_attention(backbone: Backbone, per_query: torch.Tensor, images, prompts: Sequence[str],
                            batch_size: int = 8) -> torch.Tensor:
    """Per-query maps [N, L, Q] of a Q-Former backbone → patch maps [N, L, rows*cols]: each query's value
    spread over the ViT patches by `_cross_attention` (mean over heads and cross-attention layers); the
    CLS token's share is dropped, so a map's mass can only shrink."""
    rows, cols = backbone.spec.grid_shape(backbone.config)
    out = []
    for lo in range(0, len(prompts), batch_size):
        inputs = _encoded(backbone, images[lo:lo + batch_size], prompts[lo:lo + batch_size])
        cross = _cross_attention(backbone, inputs)[..., -rows * cols:]  # [b, Q, patches]
        out.append(torch.einsum("blq,bqc->blc", per_query[lo:lo + batch_size].float(), cross.float().cpu()))
    return torch.cat(out)


@torch.no_grad()
def raw_attention_maps(backbone: Backbone, images, prompts: Sequence[str], batch_size: int = 8) -> RegionResult:
    """Maps [N, n_layers, rows*cols] of the last token's head-mean attention (see the module docstring).

    Attention probabilities are rebuilt from each layer's captured attention input by
    `LastQueryAttention`, so the LM keeps its fast attention kernel.
    """
    layers = list(range(backbone.n_layers))
    maps = torch.empty(len(prompts), len(layers), backbone.n_visual_tokens)
    for lo in range(0, len(prompts), batch_size):
        inputs = _encoded(backbone, images[lo:lo + batch_size], prompts[lo:lo + batch_size])
        site = backbone.visual_positions(inputs["input_ids"])  # [b, P]
        captures = capture_layers(backbone, inputs, layers)
        for row in range(site.shape[0]):
            for i, layer in enumerate(layers):
                attn = last_query_attention(backbone, layer, captures[layer], row)
                maps[lo + row, i] = (attn.weights / attn.denominator).mean(-1).float()[site[row]]  # [P]
    if backbone.spec.grid_site == "vit":
        maps = through_cross_attention(backbone, maps, images, prompts, batch_size)
    view = "visual tokens" if backbone.spec.grid_site == "lm" else "queries × Q-Former cross-attention to patches"
    return _grid_result(backbone, maps, layers, "raw_attention",
                        {"method": {"name": "raw_attention", "view": f"last token → {view}", "heads": "mean"}})


# ---- the validation run ----------------------------------------------------------------------------------

@dataclass
class ValidationResult:
    """Scores in percent. methods[name]: "layers", "pointing_game" / "mass_in_box" ([per layer] or a float for
    layer-less maps), "best_layers", "best_pointing_game", "best_mass_in_box", "n_samples", "per_family"
    ({family: {"n", "pointing_game", "mass_in_box"}} at the best layers), "per_question" ({"question",
    "family", "pointing_game"}: lists in sample order; a method run on fewer samples has the first ones)."""

    backbone: str
    n_samples: int
    methods: dict[str, dict]
    baselines: dict[str, float]  # random_cell, random_object
    meta: dict = field(default_factory=dict)  # selection rules, counts, each method's settings

    def to_json(self) -> dict:
        def entry(m: dict) -> dict:
            per_layer = None if not m["layers"] else {
                "layers": m["layers"], "pointing_game": [round(v, 2) for v in m["pointing_game"]],
                "mass_in_box": [round(v, 2) for v in m["mass_in_box"]]}
            families = {family: {"n": v["n"], "pointing_game": round(v["pointing_game"], 2),
                                 "mass_in_box": round(v["mass_in_box"], 2)} for family, v in m["per_family"].items()}
            return {"pointing_game": round(m["best_pointing_game"], 2), "mass_in_box": round(m["best_mass_in_box"], 2),
                    "best_layers": m["best_layers"], "per_layer": per_layer, "per_family": families,
                    "per_question": [round(v, 2) for v in m["per_question"]["pointing_game"]]}
        return {"backbone": self.backbone, "n_samples": self.n_samples, "questions": self.questions(),
                "methods": {name: entry(m) for name, m in self.methods.items()},
                "baselines": {k: round(v, 2) for k, v in self.baselines.items()}, "meta": self.meta}

    def questions(self) -> list[dict]:
        """The scored questions in sample order ({"question", "family"}), as the method run on most samples has them."""
        if not self.methods:
            return []
        longest = max((m["per_question"] for m in self.methods.values()), key=lambda q: len(q["question"]))
        return [{"question": q, "family": f} for q, f in zip(longest["question"], longest["family"])]

    def misses(self) -> list[tuple[int, dict[str, float | None]]]:
        """(sample index, {method: pointing game % at its best layers, None where not run}) for every question
        some method scores under 100 on — the questions that tell the methods apart."""
        rows = []
        for i in range(len(self.questions())):
            scores = {name: (m["per_question"]["pointing_game"][i] if i < len(m["per_question"]["pointing_game"])
                             else None) for name, m in self.methods.items()}
            if any(v is not None and v < 100 - 1e-9 for v in scores.values()):
                rows.append((i, scores))
        return rows

    def plot(self, ax=None):
        """Per-layer pointing game per method; layer-less methods and random baselines as horizontal lines."""
        fig, ax = (plt.subplots(figsize=(7, 4)) if ax is None else (ax.figure, ax))
        for i, (name, m) in enumerate(self.methods.items()):
            if m["layers"]:
                ax.plot(m["layers"], m["pointing_game"], marker="o", ms=3, label=name, color=f"C{i}")
            else:
                ax.axhline(m["pointing_game"], ls="--", lw=1.2, label=name, color=f"C{i}")
        for (name, value), style in zip(self.baselines.items(), (":", "-.")):
            ax.axhline(value, ls=style, color="grey", lw=1, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="LM layer", ylabel="pointing game (%)", ylim=(0, 100),
               title=f"{self.backbone}: does the map point at the asked-about object? (n={self.n_samples})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        return fig

    def table_markdown(self) -> str:
        lines = [f"### {self.backbone}: ground-truth validation ({self.n_samples} samples)", "",
                 "| method | best layers | pointing game % | mass in box % | samples |", "|---|---|---:|---:|---:|"]
        for name, m in self.methods.items():
            band = f"{m['best_layers'][0]}–{m['best_layers'][-1]}" if m["best_layers"] else "—"
            lines.append(f"| {name} | {band} | {m['best_pointing_game']:.1f} | {m['best_mass_in_box']:.1f} "
                         f"| {m['n_samples']} |")
        for name, value in self.baselines.items():
            lines.append(f"| {name} (baseline) | — | {value:.1f} | — | {self.n_samples} |")
        families = sorted({f for m in self.methods.values() for f in m["per_family"]})
        counts = {f: max(m["per_family"].get(f, {}).get("n", 0) for m in self.methods.values()) for f in families}
        lines += ["", "Pointing game % per question family, at each method's best layers (samples; a method run on",
                  "fewer, such as the causal one, gives its own count):", "",
                  "| method | " + " | ".join(f"{f} ({counts[f]})" for f in families) + " |",
                  "|---|" + "---:|" * len(families)]

        def cell(m: dict, family: str) -> str:
            if family not in m["per_family"]:
                return "—"
            score = m["per_family"][family]
            return f"{score['pointing_game']:.1f}" + ("" if score["n"] == counts[family] else f" ({score['n']})")

        for name, m in self.methods.items():
            lines.append(f"| {name} | " + " | ".join(cell(m, f) for f in families) + " |")
        questions = self.questions()
        lines += ["", "Questions some method misses: pointing game % at each method's best layers (· = 100, a blank",
                  "= not run on that question):", "",
                  "| # | family | question | " + " | ".join(self.methods) + " |",
                  "|---:|---|---|" + "---:|" * len(self.methods)]
        for i, scores in self.misses():
            shown = ["" if v is None else "·" if v >= 100 - 1e-9 else f"{v:.0f}" for v in scores.values()]
            lines.append(f"| {i} | {questions[i]['family']} | {questions[i]['question']} | " + " | ".join(shown) + " |")
        return "\n".join(lines) + "\n"


def select_records(backbone: Backbone, records: Sequence, correct_only: bool = True, min_objects: int | None = None,
                   batch_size: int = 8) -> tuple[list, list[Image.Image], list[str], dict[str, int]]:
    """Records with a truth box (and ≥ ``min_objects`` objects; answered right when ``correct_only``):
    (records, images, VQA prompts, how many were left after each filter). Right = the teacher-forced first
    answer token is the argmax at the last prompt position."""
    from attrib.defaults.evaluate import teacher_forced_hits

    chosen = [r for r in records if r.box("image") is not None]
    images = [r.load_image("image") for r in chosen]
    counts = {"given": len(records), "with_box": len(chosen)}
    if min_objects:
        kept = [i for i, im in enumerate(images) if count_objects(im) >= min_objects]
        chosen, images = [chosen[i] for i in kept], [images[i] for i in kept]
        counts[f"with_{min_objects}+_objects"] = len(chosen)
    prompts = [load_prompts()["vqa"].format(src=r.src) for r in chosen]
    if correct_only and chosen:
        right = []
        for lo in range(0, len(chosen), batch_size):
            hits = teacher_forced_hits(backbone, images[lo:lo + batch_size], prompts[lo:lo + batch_size],
                                       [r.truth["answer"] for r in chosen[lo:lo + batch_size]])
            right += [h[0] for h in hits]
        kept = [i for i, ok in enumerate(right) if ok]
        chosen, images, prompts = [chosen[i] for i in kept], [images[i] for i in kept], [prompts[i] for i in kept]
        counts["answered_right"] = len(chosen)
    return chosen, images, prompts, counts


def validate(backbone: Backbone, records: Sequence, config: AttributionConfig = AttributionConfig(),
             ig_steps: int = 16, correct_only: bool = True, min_objects: int | None = None,
             progress: bool = False) -> ValidationResult:
    """Score every spatial region method of the backbone, the captum and attention baselines and the random
    baselines on the records `select_records` keeps. Causal methods run on the first
    ``config.causal_samples`` samples only, as in `run_attribution`."""
    chosen, images, prompts, counts = select_records(backbone, records, correct_only, min_objects, config.batch_size)
    if not chosen:
        left = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())
        raise ValueError(f"no record left to validate on ({left})" + (" — try --all-answers" if correct_only else ""))
    sizes = [im.size for im in images]
    results = {}
    for name, method, region_set, causal in region_methods(backbone, config):
        n, method_layers = sweep_plan(backbone, config, len(prompts), causal)
        result = region_sweep(backbone, images[:n], prompts[:n], method, region_set, method_layers,
                              batch_size=config.batch_size, progress=progress)
        if region_set.shape[0] < 2:  # the per-query view of Q-Former backbones: placed by the cross-attention
            maps = through_cross_attention(backbone, result.maps, images[:n], prompts[:n], config.batch_size)
            meta = {**result.meta["method"], "view": "per-query noise × Q-Former cross-attention to patches"}
            name, result = f"{name}_patches", _grid_result(backbone, maps, method_layers, f"{name}_patches",
                                                           {"method": meta})
        results[name] = result
    # The primary noise method once more on single cells: VisEdit's window (r = 3 on LLaVA-1.5's 24 x 24
    # grid, scaled to the grid) can be wider than the objects (the world's small ones are 2 x 2 cells of
    # 8 x 8), and a window centred beside an object then scores about as high as one centred on it.
    name, method, cells, _ = region_methods(backbone, replace(config, window=0))[0]
    layers = sweep_plan(backbone, config, len(prompts), False)[1]
    if results[name].regions.window > 0:
        results[f"{name}_cell"] = region_sweep(backbone, images, prompts, method, cells, layers,
                                               batch_size=config.batch_size, progress=progress)
    if isinstance(method, VitNoise):  # the other read of the ViT noise, for comparison
        other = replace(method, read=next(read for read in VIT_READS if read != method.read))
        results[f"{name}_{other.read}_cell"] = region_sweep(backbone, images, prompts, other, cells, layers,
                                                            batch_size=config.batch_size, progress=progress)
    results["integrated_gradients"] = integrated_gradients_maps(backbone, images, prompts, ig_steps, config.batch_size)
    results["layer_integrated_gradients"] = layer_integrated_gradients_maps(backbone, images, prompts, ig_steps,
                                                                            config.batch_size)
    results["raw_attention"] = raw_attention_maps(backbone, images, prompts, config.batch_size)
    methods = {name: summarise(score_maps(r, chosen, sizes)) for name, r in results.items()}
    meta = {"selection": {**counts, "correct_only": correct_only, "min_objects": min_objects,
                          "key_token": "the model's own top-1 next token at the last prompt position"},
            "grid": list(backbone.spec.grid_shape(backbone.config)), "band_width": BAND,
            "methods": {name: {**r.meta.get("method", {}), **({"window": r.meta["window"]} if "window" in r.meta
                                                               else {})} for name, r in results.items()},
            "samples_per_method": {name: m["n_samples"] for name, m in methods.items()},
            "model_fingerprint": backbone.fingerprint()}
    baselines = random_baselines(chosen, images, backbone.spec.grid_shape(backbone.config))
    return ValidationResult(backbone.spec.name, len(chosen), methods, baselines, meta)


def write_validation(result: ValidationResult, out_dir: str | Path) -> Path:
    """validation.json, validation.png and validation.md in ``out_dir`` (JSON last, atomically)."""
    out_dir = _writable(out_dir)
    fig = result.plot()
    fig.savefig(out_dir / "validation.png", dpi=110)
    plt.close(fig)
    (out_dir / "validation.md").write_text(result.table_markdown())
    _atomic(out_dir / "validation.json", lambda p: Path(p).write_text(json.dumps(result.to_json(), indent=2) + "\n"))
    return out_dir


# ---- command line ----------------------------------------------------------------------------------------

def _arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from attrib.__main__ import _common  # lazy: attrib.__main__ may import this module

    _common(parser)
    parser.add_argument("--ig-steps", type=int, default=16, help="integration steps of the captum baselines")
    parser.add_argument("--all-answers", action="store_true", help="also score samples the model answers wrongly")
    parser.add_argument("--min-objects", type=int, default=None, help="only scenes with at least this many objects")
    parser.set_defaults(handler=validate_command)
    return parser


def add_validate_command(subparsers) -> argparse.ArgumentParser:
    """Register ``validate`` on ``python -m attrib``'s subparsers; dispatch with ``args.handler(args)``."""
    return _arguments(subparsers.add_parser("validate", help="score region maps against the world's truth boxes"))


def validate_command(args: argparse.Namespace) -> int:
    from attrib.__main__ import _load

    backbone, records = _load(args)
    result = validate(backbone, records, AttributionConfig(seed=args.seed), args.ig_steps,
                      correct_only=not args.all_answers, min_objects=args.min_objects)
    out = write_validation(result, args.out or Path("figures") / args.backbone)
    best = max(result.methods, key=lambda name: result.methods[name]["best_pointing_game"])
    print(f"{args.backbone}: {result.n_samples} samples; best pointing game {best} "
          f"{result.methods[best]['best_pointing_game']:.1f}% (random cell {result.baselines['random_cell']:.1f}%); "
          f"{out / 'validation.json'}")
    return 0


def validate_main(argv: list[str] | None = None) -> int:
    """``python -m attrib validate`` as a function: errors print one line and return 2."""
    from attrib.data import DataError

    args = _arguments(argparse.ArgumentParser(prog="python -m attrib validate")).parse_args(argv)
    try:
        return validate_command(args)
    except (DataError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
