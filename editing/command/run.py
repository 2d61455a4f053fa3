"""The ``edit`` pipeline behind ``visedit edit`` / ``make edit``: place, train, evaluate, report.

    result = run_edit(EditOptions(backbone="llava", steps=2000, out=Path("runs/edit/llava")))
    # runs/edit/llava/results.json, results.md, adapter.safetensors, im_maps.png, checkpoint/, attribution/

Order: records (checked up front, `editing.checks`) → placement (from ``checkpoint``'s metadata, else
the ``attribution`` artifact, else a fresh attribution run on a few world records, saved under
``out/attribution``) → training (skipped with ``checkpoint``) → single-edit evaluation → IM maps and
their pointing game → inference overhead (edited / unedited forward time) → results files.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from attrib.backbones.loader import Backbone
from attrib.backbones.spec import get_spec
from attrib.commands import WORLD
from attrib.data import DataError, EditRecord, load_records
from attrib.defaults import load_model
from attrib.io import OutputLock, atomic_savefig, atomic_write_text, stored_path
from attrib.parallel import barrier, main_first, processes
from attrib.prompts import load_prompts
from editing.adapter.vead import VeadConfig, lm_width
from editing.adapter.visedit import EditPlacement, VisEditEditor, weights_config, weights_placement
from editing.checks import usable_records
from editing.command.report import METRICS, results_markdown
from editing.editor import Editor, EditRequest
from editing.evaluation.evaluate import evaluate_edits
from editing.evaluation.latency import forward_seconds, latency_ratio
from editing.evaluation.localisation import im_maps
from editing.training.config import TrainConfig
from editing.training.loop import train
from editing.training.recipe import default_lr, default_steps, sized_vead_config

TASKS = ("vqa", "caption")


@dataclass
class EditOptions:
    """The command's options (see ``visedit edit --help``)."""

    backbone: str = "llava"
    model: Path | None = None
    device: str = "auto"  # `attrib.backbones.placement`
    dtype: str = "auto"
    task: str = "vqa"  # "vqa" (E-VQA) or "caption" (E-IC): which prompt format wraps src and rephrase
    train: Path | None = None
    eval: Path | None = None
    images: Path | None = None
    attribution: Path | None = None
    checkpoint: Path | None = None
    steps: int | None = None  # None: `default_steps` of the backbone
    out: Path | None = None  # None: runs/edit/<backbone>
    resume: bool = False
    skip_bad: bool = False
    batch_size: int = 4
    lr: float | None = None  # None: `default_lr` of the LM width
    seed: int = 0
    mid_dim: int | None = None
    heads: int | None = None
    scene_gate: bool = True  # our extension (editing.adapter.scene_gate); False: the paper's adapter
    scene_similarity: str = "salient"  # what the scene gate compares: "salient" | "chamfer"
    target_role: bool = True  # our extension (editing.adapter.vead): VEAD's keys mark the edit's target tokens
    n_eval: int | None = None
    attribution_n: int = 24  # as many records as `visedit heatmaps` (8 moved BLIP-2's edit layer: 0 vs -1)
    ceiling_n: int = 48
    maps_n: int = 200
    checkpoint_every: int = 100
    rows_per_backward: int = 0  # TrainConfig.rows_per_backward: 0 = every row of a step at once
    same_image_weight: float = 0.0  # TrainConfig.same_image_weight: 0 = no same-image locality term
    progress: bool = True

    def output(self) -> Path:
        """The output folder: ``out``, or runs/edit/<backbone>."""
        return self.out or Path("runs/edit") / self.backbone


def inference_overhead(editor: Editor, records: list[EditRecord], task: str) -> float | None:
    """Edited over unedited forward time (`editing.evaluation.latency`) on a batch of up to 4 eval inputs
    with one edit, the first input's, applied."""
    if not records:
        return None
    formats = load_prompts()
    rows = records[:4]
    images, prompts = [r.load_image("image") for r in rows], [formats[task].format(src=r.src) for r in rows]
    editor.restore()
    before = forward_seconds(editor, images, prompts)
    editor.edit(EditRequest.from_record(rows[0], task, formats))
    try:
        edited = forward_seconds(editor, images, prompts)
    finally:
        editor.restore()
    return latency_ratio(edited, before, forward_seconds(editor, images, prompts))


def _files(options: EditOptions) -> tuple[Path, Path]:
    if options.task not in TASKS:
        raise ValueError(f"unknown task {options.task!r}; use vqa or caption")
    default = options.train is None and options.eval is None
    if (options.train is None) != (options.eval is None) and options.checkpoint is None:
        raise ValueError("give both --train and --eval (or neither, for the world's files)")
    train_file = options.train or WORLD / f"{options.task}_train.json"
    eval_file = options.eval or WORLD / f"{options.task}_eval.json"
    if default and not eval_file.is_file():
        raise DataError(f"{eval_file}: the world data is not there; write it with `visedit world --seed 1 --out "
                        f"{WORLD}` (make does) or pass --train/--eval/--images")
    return train_file, eval_file


def _records(options: EditOptions, backbone: Backbone, train_file: Path, eval_file: Path, formats: dict[str, str]
             ) -> tuple[list[EditRecord], list[EditRecord], dict[str, list[str]]]:
    """The usable training and evaluation records (no training records with ``checkpoint``) and, per split,
    one line per record skipped (with ``skip_bad``; otherwise the first bad record stops the run)."""
    eval_records = load_records(eval_file, options.images, n=options.n_eval)
    eval_records, bad_eval = usable_records(backbone, eval_records, options.task, formats, options.skip_bad)
    train_records, bad_train = [], []
    if options.checkpoint is None:
        train_records = load_records(train_file, options.images)
        train_records, bad_train = usable_records(backbone, train_records, options.task, formats, options.skip_bad)
    if not eval_records or (options.checkpoint is None and not train_records):
        raise DataError(f"no usable records left (train {len(train_records)}, eval {len(eval_records)})")
    return train_records, eval_records, {"train": bad_train, "eval": bad_eval}


def _placement(options: EditOptions, backbone: Backbone, eval_file: Path, eval_records: list[EditRecord],
               out: Path) -> tuple[EditPlacement, dict]:
    """The placement and where it came from (``source`` plus the artifact's ceiling when known)."""
    if options.checkpoint is not None:
        source = f"adapter metadata ({stored_path(options.checkpoint)})"
        return weights_placement(options.checkpoint), {"source": source}
    if options.attribution is not None:
        path = options.attribution / "attribution.json" if options.attribution.is_dir() else options.attribution
        placement = EditPlacement.from_artifact(path, backbone)
        ceiling = json.loads(path.read_text())["placement"].get("ceiling")
        return placement, {"source": stored_path(path), "ceiling": ceiling}
    from attrib.attribution import AttributionConfig, run_attribution

    # Attribution prompts are VQA questions: caption runs use the world's VQA file beside the captions.
    vqa_file = eval_file.with_name("vqa_eval.json")
    records = eval_records
    if options.task == "caption" and vqa_file.is_file():
        records = load_records(vqa_file, options.images)
    config = AttributionConfig(draws=2, causal_samples=1, causal_draws=1, ceiling_samples=options.ceiling_n)
    work = out / "attribution-work"  # finished chunks: a killed run resumes the attribution from them
    attribution = run_attribution(backbone, records[:options.attribution_n], config, dataset=str(eval_file),
                                  ceiling_records=records, progress=options.progress, work=work)
    folder = out / "attribution"
    if processes().main:  # under `accelerate launch` the chunks were shared out; one process writes
        attribution.save(folder)
        shutil.rmtree(work, ignore_errors=True)
        attribution.plot_all(folder, n_overlays=2)
    barrier()  # the others read the placement from the artifact the main process wrote
    placed = attribution.placement
    placement = EditPlacement.from_artifact(folder, backbone)
    return placement, {"source": stored_path(folder / "attribution.json"), "ceiling": placed.to_json().get("ceiling")}


def _adapter_config(options: EditOptions, backbone: Backbone) -> VeadConfig:
    if options.checkpoint is not None:
        return weights_config(options.checkpoint)
    return sized_vead_config(lm_width(backbone.config), options.mid_dim, options.heads, options.scene_gate,
                             options.scene_similarity, options.target_role)


def _train(options: EditOptions, editor: VisEditEditor, records: list[EditRecord], out: Path
           ) -> tuple[float | None, dict | None, Path]:
    """Train the adapter (unless ``checkpoint`` gives one): (train_s, training info, adapter weights file)."""
    if options.checkpoint is not None:
        return None, None, options.checkpoint
    lr = options.lr or default_lr(lm_width(editor.backbone.config))
    steps = options.steps or default_steps(options.backbone, options.task)
    config = TrainConfig(steps=steps, batch_size=options.batch_size, lr=lr, seed=options.seed,
                         checkpoint_every=options.checkpoint_every, task=options.task,
                         rows_per_backward=options.rows_per_backward, same_image_weight=options.same_image_weight)
    trained = train(editor, records, config, out / "checkpoint", resume=options.resume, progress=options.progress)
    info = {"steps": trained.steps, "config": config.to_json(), "products_s": round(trained.products_s, 2)}
    weights = editor.save_weights(out / "adapter.safetensors") if processes().main else None
    return round(trained.train_s, 2), info, weights


def _method_scores(scores: dict, maps, config: VeadConfig) -> dict:
    """The ``methods.visedit`` entry: the five metrics and their splits, the IM maps' and gates' summaries."""
    visedit = {k: scores[k] for k in METRICS}
    visedit.update({k: scores[k] for k in ("exact_match", "secondary", "m_loc_same_object", "m_loc_other",
                                           "n_same_object", "n_other", "loc_same_image", "n_same_image", "targets",
                                           "protocol")})
    visedit["im_pointing_game"] = maps.pointing_game()
    visedit["im_pointing_note"] = maps.note
    visedit["im_gate_mean"] = maps.gate_means()
    visedit["scene_gate"] = config.scene_gate
    visedit["scene_similarity"] = config.scene_similarity if config.scene_gate else None
    visedit["scene_gate_mean"] = maps.scene_means()
    visedit["target_role"] = config.target_role
    return visedit


def run_edit(options: EditOptions) -> dict:
    """Run the pipeline of the module docstring; returns the results dict (also written to disk). A second
    run on the same output folder is refused while this one runs (`OutputLock`)."""
    torch.manual_seed(options.seed)
    get_spec(options.backbone)  # a wrong backbone name is reported before any file is looked for
    train_file, eval_file = _files(options)  # checks the task first
    with main_first(OutputLock(options.output())):
        return _run_edit(options, train_file, eval_file)


def _run_edit(options: EditOptions, train_file: Path, eval_file: Path) -> dict:
    backbone = load_model(options.backbone, options.model, options.device, options.dtype)
    formats = load_prompts()
    train_records, eval_records, skipped = _records(options, backbone, train_file, eval_file, formats)
    out = options.output()
    out.mkdir(parents=True, exist_ok=True)
    placement, placement_info = _placement(options, backbone, eval_file, eval_records, out)
    config = _adapter_config(options, backbone)
    editor = VisEditEditor(backbone, placement, config, weights=options.checkpoint)
    train_s, train_info, adapter_path = _train(options, editor, train_records, out)
    evaluated = evaluate_edits(editor, eval_records, options.task, prompts=formats, progress=options.progress)
    if not processes().main:  # under `accelerate launch` every step so far was shared out; one process reports
        editor.remove()
        return {}
    scores = evaluated.to_json()
    maps = im_maps(editor, eval_records, options.task, formats, limit=options.maps_n)
    figure = maps.plot(n=4)
    atomic_savefig(figure, out / "im_maps.png")
    plt.close(figure)
    world = options.train is None and options.eval is None
    results = {
        "backbone": options.backbone,
        "dataset": f"world E-{'VQA' if options.task == 'vqa' else 'IC'}" if world else stored_path(eval_file),
        "n_eval": scores["n_eval"],
        "n_skipped": {split: len(lines) for split, lines in skipped.items()},
        "skipped": (skipped["train"] + skipped["eval"])[:20],
        "placement": {**placement.to_json(), **placement_info},
        "methods": {"visedit": _method_scores(scores, maps, config)},
        "timing": {"train_s": train_s, "edit_ms": scores["edit_ms"],
                   "inference_overhead": inference_overhead(editor, eval_records, options.task)},
        "model": {"path": stored_path(backbone.path), "fingerprint": backbone.fingerprint(),
                  "dtype": str(backbone.model.dtype).removeprefix("torch."), "device": str(backbone.device)},
        "adapter": {"path": stored_path(adapter_path), "config": config.to_json()},
        "train": train_info,
        "data": {"task": options.task, "train": None if options.checkpoint else stored_path(train_file),
                 "eval": stored_path(eval_file), "images": stored_path(options.images)},
    }
    editor.remove()
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    return results
