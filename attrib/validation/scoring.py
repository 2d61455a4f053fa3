"""Scoring a region map against the truth: does it point at the asked-about object?

A map's region c is drawn at its own grid cell (row-major), whose pixel rectangle is image_size / grid
side wide; a cell is *in the box* when its centre lies inside it.
- pointing game: the maximum cell is in the box. Tied maxima share the credit, so a flat map scores
  exactly the random-cell baseline instead of whatever cell 0 happens to be.
- mass in box: share of the map's mass, negatives clipped to 0, on cells in the box (flat if no mass).
- best band: the contiguous band of up to 3 layers with the highest mean pointing game. It is chosen on
  the scored samples themselves, so it is optimistic; per-layer curves are kept too.
- per family: both scores at the best band split by the world's question family (``truth["family"]``), so
  a method that misses one kind of question is told apart from one that misses at random.
- random cell: expected pointing game of a uniformly random cell = mean of (cells in box / all cells).
- random object: expected score of picking one of the scene's objects at random = mean of 1 / n_objects,
  objects counted from the image (`count_objects`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from attrib.regions.result import RegionResult

BAND = 3  # widest layer band reported as best
Size = tuple[int, int]  # (width, height) px


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
