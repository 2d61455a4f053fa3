"""The ``edit`` pipeline behind ``python -m editing edit`` / ``make edit``: place, train, evaluate, report.

    result = run_edit(EditOptions(backbone="llava", steps=2000, out=Path("runs/llava")))
    # runs/llava/results.json, results.md, adapter.safetensors, im_maps.png, checkpoint/, attribution/

Order: records (checked up front, `editing.checks`) → placement (from ``checkpoint``'s metadata, else
the ``attribution`` artifact, else a fresh attribution run on a few world records, saved under
``out/attribution``) → training (skipped with ``checkpoint``) → single-edit evaluation → IM maps and
their pointing game → inference overhead (edited / unedited forward time) → results files.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from attrib.backbones.loader import Backbone
from attrib.backbones.spec import get_spec
from attrib.data import DataError, EditRecord, load_records
from attrib.defaults.recipe import load_model
from attrib.prompts import load_prompts
from editing.checks import usable_records
from editing.editor import EditPlacement, EditRequest, VisEditEditor, weights_config, weights_placement
from editing.evaluation import evaluate_edits
from editing.localisation import im_maps
from editing.train import TrainConfig, train
from editing.vead import VeadConfig, lm_width

WORLD = Path("runs/world")  # written by `python -m attrib.world --seed 1 --out runs/world` (make's rule)
TASKS = {"vqa": "vqa", "caption": "caption"}
METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")


@dataclass
class EditOptions:
    """The CLI's options (see ``python -m editing edit --help``)."""

    backbone: str = "llava"
    model: Path | None = None
    data: str = "vqa"
    train: Path | None = None
    eval: Path | None = None
    images: Path | None = None
    attribution: Path | None = None
    checkpoint: Path | None = None
    steps: int | None = None  # None: `default_steps` of the backbone
    out: Path | None = None
    resume: bool = False
    skip_bad: bool = False
    batch_size: int = 4
    lr: float | None = None  # None: `default_lr` of the LM width
    seed: int = 0
    mid_dim: int | None = None
    heads: int | None = None
    scene_gate: bool = True  # our extension (editing.vead); False: the paper's adapter
    scene_similarity: str = "salient"  # what the scene gate compares (editing.vead): "salient" | "chamfer"
    target_role: bool = True  # our extension (editing.vead): VEAD's keys mark the edit's target tokens
    n_eval: int | None = None
    attribution_n: int = 24  # as many records as `make heatmaps` (8 moved BLIP-2's edit layer: 0 vs -1)
    ceiling_n: int = 48
    maps_n: int = 200
    checkpoint_every: int = 100
    progress: bool = True


def default_steps(backbone: str) -> int:
    """Training steps when none are asked for. 1,000 left the losses still falling fast (LLaVA default:
    running rel NLL 0.86 at step 915, 0.54 at 995); 2,000 fit `make edit`'s 20-min budget on the Q-Former
    defaults. LLaVA gets 1,750: its rows carry 64 visual tokens (a step takes 0.43 s against BLIP-2's
    0.11 s) and 2,000 steps made its run 24.8 min; at 1,500 it took 16.9 min but T-Gen fell to 90.0
    (97.7 at 2,000). BLIP-2 trained twice as long gained nothing beyond the run-to-run spread (M-Loc
    83.7 against 82.3)."""
    return 1750 if backbone == "llava" else 2000


def default_lr(width: int) -> float:
    """Adam LR of the adapter: the paper's 1e-4 for 7B-scale LMs (width ≥ 2048); 1e-3 below. Measured on
    the default LLaVA (128 wide, 1,000 steps, world E-VQA): Rel / T-Gen / M-Gen 17.3 / 14.7 / 21.7 at 1e-4
    against 40.7 / 33.7 / 39.0 at 1e-3, T-Loc 100 and M-Loc ~60 in both."""
    return 1e-4 if width >= 2048 else 1e-3


def sized_vead_config(width: int, mid_dim: int | None = None, heads: int | None = None,
                      scene_gate: bool = False, scene_similarity: str = "salient",
                      target_role: bool = False) -> VeadConfig:
    """Adapter sizes from the LM width: the paper's mid 1024 from width 2048 up (7B: 4096 → 1024,
    OPT-2.7B: 2560 → 1024), the width itself below (small LMs would otherwise get a wider adapter than
    model); heads: the largest of 8, 4, 2, 1 that divides."""
    mid = mid_dim or (1024 if width >= 2048 else width)
    pick = lambda n: next(h for h in (8, 4, 2, 1) if n % h == 0)  # noqa: E731
    return VeadConfig(mid_dim=mid, n_heads=heads or pick(mid), im_hidden=mid, im_heads=pick(width),
                      scene_gate=scene_gate, scene_similarity=scene_similarity, target_role=target_role)


def _files(options: EditOptions) -> tuple[Path, Path]:
    if options.data not in TASKS:
        raise ValueError(f"unknown data {options.data!r}; use vqa or caption")
    default = options.train is None and options.eval is None
    if (options.train is None) != (options.eval is None) and options.checkpoint is None:
        raise ValueError("give both --train and --eval (or neither, for the world's files)")
    train_file = options.train or WORLD / f"{options.data}_train.json"
    eval_file = options.eval or WORLD / f"{options.data}_eval.json"
    if default and not eval_file.is_file():
        raise DataError(f"{eval_file}: the world data is not there; write it with `python -m attrib.world "
                        f"--seed 1 --out {WORLD}` or pass --train/--eval/--images")
    return train_file, eval_file


def _placement(options: EditOptions, backbone: Backbone, eval_file: Path, eval_records: list[EditRecord],
               out: Path) -> tuple[EditPlacement, dict]:
    """The placement and where it came from (``source`` plus the artifact's ceiling when known)."""
    if options.checkpoint is not None:
        return weights_placement(options.checkpoint), {"source": f"adapter metadata ({options.checkpoint})"}
    if options.attribution is not None:
        path = options.attribution / "attribution.json" if options.attribution.is_dir() else options.attribution
        data = json.loads(path.read_text())
        placement = EditPlacement.from_artifact(path, backbone, data["placement"].get("im_read_layer"))
        return placement, {"source": str(path), "ceiling": data["placement"].get("ceiling")}
    from attrib.attribution import AttributionConfig, run_attribution

    # Attribution prompts are VQA questions: caption runs use the world's VQA file beside the captions.
    vqa_file = eval_file.with_name("vqa_eval.json")
    records = eval_records
    if options.data == "caption" and vqa_file.is_file():
        records = load_records(vqa_file, options.images)
    config = AttributionConfig(draws=2, causal_samples=1, causal_draws=1, ceiling_samples=options.ceiling_n)
    attribution = run_attribution(backbone, records[:options.attribution_n], config, dataset=str(eval_file),
                                  ceiling_records=records, progress=options.progress)
    folder = attribution.save(out / "attribution")
    attribution.plot_all(folder, n_overlays=2)
    placed = attribution.placement
    placement = EditPlacement.from_artifact(folder, backbone, placed.im_read_layer)
    return placement, {"source": str(folder / "attribution.json"), "ceiling": placed.to_json().get("ceiling")}


@torch.no_grad()
def inference_overhead(editor: VisEditEditor, records: list[EditRecord], task: str, repeats: int = 5) -> float | None:
    """Median edited / unedited forward time on a batch of up to 4 eval inputs (adapter share as deployed)."""
    if not records:
        return None
    formats = load_prompts()
    rows = records[:4]
    backbone = editor.backbone
    inputs = backbone.encode([r.load_image("image") for r in rows], [formats[task].format(src=r.src) for r in rows])

    def timed() -> float:
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            backbone.forward(inputs, use_cache=False)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    editor.restore()
    plain = timed()
    editor.edit(EditRequest.from_record(rows[0], task, formats))
    try:
        edited = timed()
    finally:
        editor.restore()
    return round(edited / plain, 4)


def _markdown(results: dict) -> str:
    m = results["methods"]["visedit"]
    cell = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"# VisEdit on {results['backbone']} — {results['dataset']} ({results['n_eval']} edits)", "",
             "| method | Rel | T-Gen | M-Gen | T-Loc | M-Loc | M-Loc same object | M-Loc other | IM pointing game |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             "| VisEdit | " + " | ".join(cell(m[k]) for k in METRICS) + f" | {cell(m['m_loc_same_object'])} | "
             f"{cell(m['m_loc_other'])} | {cell(m['im_pointing_game'])} |", "",
             "Exact match: " + ", ".join(f"{k} {cell(v)}" for k, v in m["exact_match"].items()) + ".",
             f"Secondary ({m['secondary']['protocol']}): T-Loc top-1 {cell(m['secondary']['t_loc_top1'])}, "
             f"M-Loc top-10 {cell(m['secondary']['m_loc_top10'])}.", ""]
    p, t = results["placement"], results["timing"]
    products = f" (per-record products {results['train']['products_s']} s)" if results.get("train") else ""
    lines += [f"Placement: edit layer {p['edit_layer']}, IM read layer {p['im_read_layer']}, IT layers "
              f"{p['it_layers']} (from {p['source']}).",
              f"Timing: train {t['train_s']} s{products}, edit {t['edit_ms']} ms, "
              f"inference overhead {t['inference_overhead']}."]
    gate = m.get("im_gate_mean") or {}
    if gate.get("edit_image") is not None:  # both means exist together: im_maps reads them in pairs
        lines.append(f"IM gate σ(IM), mean over visual tokens: {gate['edit_image']:.3f} on the edits' own inputs, "
                     f"{gate['unrelated_image']:.3f} on their unrelated M-Loc inputs.")
    scene = m.get("scene_gate_mean")
    if scene:
        similarity = m.get("scene_similarity") or "chamfer"
        lines.append(f"Scene gate ({similarity}), mean: {scene['image_rephrase']:.3f} on the edits' re-rendered images, "
                     f"{scene['m_loc']:.3f} on their unrelated M-Loc images.")
    if m.get("target_role"):
        lines.append("VEAD marks the edit sample's target tokens (target role).")
    if m.get("im_pointing_note"):
        lines.append(f"IM pointing game: {m['im_pointing_note']}.")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_edit(options: EditOptions) -> dict:
    """Run the pipeline of the module docstring; returns the results dict (also written to disk)."""
    torch.manual_seed(options.seed)
    get_spec(options.backbone)  # a wrong backbone name is reported before any file is looked for
    train_file, eval_file = _files(options)  # checks --data first
    task = TASKS[options.data]
    backbone = load_model(options.backbone, options.model)
    formats = load_prompts()
    eval_records = load_records(eval_file, options.images, n=options.n_eval)
    eval_records, bad_eval = usable_records(backbone, eval_records, task, formats, options.skip_bad)
    train_records, bad_train = [], []
    if options.checkpoint is None:
        train_records = load_records(train_file, options.images)
        train_records, bad_train = usable_records(backbone, train_records, task, formats, options.skip_bad)
    if not eval_records or (options.checkpoint is None and not train_records):
        raise DataError(f"no usable records left (train {len(train_records)}, eval {len(eval_records)})")
    out = options.out or Path("runs") / options.backbone
    out.mkdir(parents=True, exist_ok=True)
    placement, placement_info = _placement(options, backbone, eval_file, eval_records, out)
    config = (weights_config(options.checkpoint) if options.checkpoint is not None
              else sized_vead_config(lm_width(backbone.config), options.mid_dim, options.heads, options.scene_gate,
                                     options.scene_similarity, options.target_role))
    editor = VisEditEditor(backbone, placement, config, weights=options.checkpoint)
    train_s, train_info = None, None
    if options.checkpoint is None:
        lr = options.lr or default_lr(lm_width(backbone.config))
        steps = options.steps or default_steps(options.backbone)
        train_config = TrainConfig(steps=steps, batch_size=options.batch_size, lr=lr,
                                   seed=options.seed, checkpoint_every=options.checkpoint_every, task=task)
        trained = train(editor, train_records, train_config, out / "checkpoint", resume=options.resume,
                        progress=options.progress)
        train_s, train_info = round(trained.train_s, 2), {"steps": trained.steps, "config": train_config.to_json(),
                                                          "products_s": round(trained.products_s, 2)}
        adapter_path = editor.save_weights(out / "adapter.safetensors")
    else:
        adapter_path = options.checkpoint
    scores = evaluate_edits(editor, eval_records, task, prompts=formats, progress=options.progress).to_json()
    maps = im_maps(editor, eval_records, task, formats, limit=options.maps_n)
    figure = maps.plot(n=4)
    figure.savefig(out / "im_maps.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    visedit = {k: scores[k] for k in METRICS}
    visedit.update({k: scores[k] for k in ("exact_match", "secondary", "m_loc_same_object", "m_loc_other",
                                           "n_same_object", "n_other", "protocol")})
    visedit["im_pointing_game"] = maps.pointing_game()
    visedit["im_pointing_note"] = maps.note
    visedit["im_gate_mean"] = maps.gate_means()
    visedit["scene_gate"] = config.scene_gate
    visedit["scene_similarity"] = config.scene_similarity if config.scene_gate else None
    visedit["scene_gate_mean"] = maps.scene_means()
    visedit["target_role"] = config.target_role
    default_world = options.train is None and options.eval is None
    results = {
        "backbone": options.backbone,
        "dataset": f"world E-{'VQA' if task == 'vqa' else 'IC'}" if default_world else str(eval_file),
        "n_eval": scores["n_eval"],
        "n_skipped": {"train": len(bad_train), "eval": len(bad_eval)},
        "skipped": (bad_train + bad_eval)[:20],
        "placement": {**placement.to_json(), **placement_info},
        "methods": {"visedit": visedit},
        "timing": {"train_s": train_s, "edit_ms": scores["edit_ms"],
                   "inference_overhead": inference_overhead(editor, eval_records, task)},
        "model": {"path": str(backbone.path), "fingerprint": backbone.fingerprint()},
        "adapter": {"path": str(adapter_path), "config": config.to_json()},
        "train": train_info,
        "data": {"task": task, "train": None if options.checkpoint else str(train_file), "eval": str(eval_file),
                 "images": None if options.images is None else str(options.images)},
    }
    editor.remove()
    _write(out / "results.json", json.dumps(results, indent=2) + "\n")
    _write(out / "results.md", _markdown(results))
    return results
