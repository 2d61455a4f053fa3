"""Ground-truth validation of region attribution: does the map point at the object the question is about?

On the synthetic world every VQA record knows the pixel box of the asked-about object, so a region method
can be scored, per layer, against the truth (`attrib.validation.scoring`) and against standard baselines
(`attrib.validation.baselines`).

    backbone = load_backbone("llava", path)
    records = load_records("runs/world/vqa_eval.json", n=24)
    result = validate(backbone, records, AttributionConfig())
    write_validation(result, "runs/validate/llava")        # validation.json, validation.png, validation.md

Methods: every region method of the backbone (`attrib.regions.registry`) at the configured window, and the
primary noise method (attention_noise / vit_noise) once more on single cells as ``<name>_cell`` when that
window is wider; Q-Former backbones also get the ViT noise's other read on single cells as
``vit_noise_<read>_cell`` (``vit_noise_propagated_cell`` with the default read; see
`attrib.regions.vit_noise`), and ``query_noise_patches``: VisEdit's noise on each LM query token (the
per-query view) spread over the ViT patches by the Q-Former's cross-attention, the composition the
raw-attention baseline uses (`through_cross_attention`), so the two differ only in what the LM side
measures. Then the baselines: integrated_gradients, layer_integrated_gradients, raw_attention, and the
random cell and random object scores.

Gotchas: the key token is the model's own top-1 next token (as in every region method); with
``correct_only`` only the questions the model answers right are kept. Grid geometry assumes square images
(the world's), which the processors resize without cropping.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
from PIL import Image

from attrib.answers import teacher_forced_hits
from attrib.backbones.loader import Backbone
from attrib.config import AttributionConfig
from attrib.io import atomic_savefig, atomic_write_text, writable_dir
from attrib.prompts import load_prompts
from attrib.regions.registry import methods_for, sweep_plan
from attrib.regions.result import RegionResult
from attrib.regions.sweep import region_sweep
from attrib.regions.vit_noise import VIT_READS, VitNoise
from attrib.validation.baselines import (
    grid_result,
    integrated_gradients_maps,
    layer_integrated_gradients_maps,
    raw_attention_maps,
    through_cross_attention,
)
from attrib.validation.result import ValidationResult
from attrib.validation.scoring import BAND, count_objects, random_baselines, score_maps, summarise


def select_records(backbone: Backbone, records: Sequence, correct_only: bool = True, min_objects: int | None = None,
                   batch_size: int = 8) -> tuple[list, list[Image.Image], list[str], dict[str, int]]:
    """Records with a truth box (and ≥ ``min_objects`` objects; answered right when ``correct_only``):
    (records, images, VQA prompts, how many were left after each filter). Right = the teacher-forced first
    answer token is the argmax at the last prompt position."""
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
    baselines on the records `select_records` keeps. Costly methods (the causal effect) run on the first
    ``config.causal_samples`` samples only, as in `run_attribution`."""
    chosen, images, prompts, counts = select_records(backbone, records, correct_only, min_objects, config.batch_size)
    if not chosen:
        left = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())
        raise ValueError(f"no record left to validate on ({left})" + (" — try --all-answers" if correct_only else ""))
    results = region_results(backbone, images, prompts, config, progress)
    results["integrated_gradients"] = integrated_gradients_maps(backbone, images, prompts, ig_steps, config.batch_size)
    results["layer_integrated_gradients"] = layer_integrated_gradients_maps(backbone, images, prompts, ig_steps,
                                                                            config.batch_size)
    results["raw_attention"] = raw_attention_maps(backbone, images, prompts, config.batch_size)
    sizes = [im.size for im in images]
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


def region_results(backbone: Backbone, images: Sequence[Image.Image], prompts: Sequence[str],
                   config: AttributionConfig, progress: bool = False) -> dict[str, RegionResult]:
    """The maps of every spatial region method of the backbone (module docstring), by result name."""
    results = {}
    for entry in methods_for(backbone):
        n, method_layers = sweep_plan(backbone, config, len(prompts), entry.costly)
        region_set = entry.regions(backbone, config)
        result = region_sweep(backbone, images[:n], prompts[:n], entry.method(config), region_set, method_layers,
                              batch_size=config.batch_size, progress=progress)
        name = entry.name
        if region_set.shape[0] < 2:  # the per-query view of Q-Former backbones: placed by the cross-attention
            maps = through_cross_attention(backbone, result.maps, images[:n], prompts[:n], config.batch_size)
            meta = {**result.meta["method"], "view": "per-query noise × Q-Former cross-attention to patches"}
            name, result = f"{name}_patches", grid_result(backbone, maps, method_layers, f"{name}_patches",
                                                          {"method": meta})
        results[name] = result
    # The primary noise method once more on single cells: VisEdit's window (r = 3 on LLaVA-1.5's 24 x 24
    # grid, scaled to the grid) can be wider than the objects (the world's small ones are 2 x 2 cells of
    # 8 x 8), and a window centred beside an object then scores about as high as one centred on it.
    primary = methods_for(backbone)[0]
    cell_config = replace(config, window=0)
    name, method, cells = primary.name, primary.method(cell_config), primary.regions(backbone, cell_config)
    layers = sweep_plan(backbone, config, len(prompts), False)[1]
    if results[name].regions.window > 0:
        results[f"{name}_cell"] = region_sweep(backbone, images, prompts, method, cells, layers,
                                               batch_size=config.batch_size, progress=progress)
    if isinstance(method, VitNoise):  # the other read of the ViT noise, for comparison
        other = replace(method, read=next(read for read in VIT_READS if read != method.read))
        results[f"{name}_{other.read}_cell"] = region_sweep(backbone, images, prompts, other, cells, layers,
                                                            batch_size=config.batch_size, progress=progress)
    return results


def write_validation(result: ValidationResult, out_dir: str | Path) -> Path:
    """validation.json, validation.png and validation.md in ``out_dir`` (JSON last, atomically)."""
    out_dir = writable_dir(out_dir)
    fig = result.plot()
    atomic_savefig(fig, out_dir / "validation.png")
    plt.close(fig)
    atomic_write_text(out_dir / "validation.md", result.table_markdown())
    atomic_write_text(out_dir / "validation.json", json.dumps(result.to_json(), indent=2) + "\n")
    return out_dir
