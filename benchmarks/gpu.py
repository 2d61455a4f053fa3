"""`make bench-gpu` / ``visedit bench-gpu``: what the toolkit costs at the real backbone sizes on one GPU.

What it is for: the figures a user with a GPU plans by, each beside its goal for one H100-class GPU —
seconds per sample of the contribution pass and of the full region sweep (every LM layer, the whole grid),
the VEAD + IM training step and its peak memory at batch 4, and what an applied edit adds to a forward —
and the wall time of the official LLaVA E-VQA training schedule projected from the measured step.

    visedit bench-gpu                                    # llava, blip2, minigpt4; full size, cuda, bf16
    visedit bench-gpu --backbone llava --train-steps 20  # make bench-gpu BACKBONE=llava
    visedit bench-gpu --size reduced --device cpu        # the same code on small models (the test runs this)

Each backbone is built in memory, random-initialised (seed 0) in ``--dtype`` directly on ``--device``: the
published architecture with the world's tokenizer (`benchmarks.smoke_full.full_config`), or with
``--size reduced`` the same families at `REDUCED_SIZES` (4 LM layers, 64 wide, an 8 × 8 grid). The records
are world E-VQA records with a truth box. Per backbone, every timed call follows one untimed warm-up call:

1. contribution: `attrib.contribution.contribution`, one sample a call;
2. region sweep: `attrib.regions.region_sweep` over every LM layer with the official settings —
   `AttentionNoise` on the LM visual-token grid (LLaVA: 24 × 24) or `VitNoise` on the ViT patch grid
   (BLIP-2, MiniGPT-4: 16 × 16); the warm-up sweeps one layer of one sample;
3. training: `editing.training.loop.train` at batch 4, the adapter sized as at full scale at the paper's
   layers; a warm-up run of one step, then the timed run. The step time leaves out the per-record products
   (edit signals, pre-edit outputs, IM targets: computed once per record, `TrainResult.products_s`), as
   `smoke-full` reports it. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak
   RSS on a CPU (``peak_memory_kind`` says which); either includes the backbone's weights;
4. forward: one edit applied, ``backbone.forward`` timed edited and restored in turns; the ratio of medians.

Writes ``OUT/bench_gpu.json`` and prints a table. Gotchas: random weights cost what trained ones of the
same shapes do, but nothing here measures quality; at full size on a CPU a 7B backbone needs ~16 GB of RAM
and hours — use ``--size reduced`` there, whose figures say nothing about the goals.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import transformers
from tqdm import tqdm

from attrib.backbones.build import CONFIG_BUILDERS, BackboneSizes, build_processor
from attrib.backbones.loader import Backbone
from attrib.backbones.placement import DTYPES
from attrib.backbones.spec import get_spec
from attrib.data import EditRecord
from attrib.io import OutputLock, atomic_write_text, stored_path
from benchmarks.bench import Goal
from benchmarks.smoke_full import full_config, paper_layers, peak_rss_mb, reset_peak_rss, world_records

BACKBONES = ("llava", "blip2", "minigpt4")
SIZES = ("full", "reduced")
# Small enough for a CPU test in seconds, with every part the full sizes have (an 8 × 8 grid on both sites).
REDUCED_SIZES = BackboneSizes(
    image_size=64, patch_size=8, vision_hidden=64, vision_layers=2, vision_heads=4, vision_mlp=128,
    text_hidden=64, text_layers=4, text_heads=4, text_mlp=128, num_query_tokens=8, qformer_hidden=64,
    qformer_layers=1, qformer_heads=4, qformer_mlp=128, max_positions=256,
)
TRAIN_BATCH = 4
# Goals at full size on one H100-class GPU; the sweep's is set for LLaVA-1.5-7B only.
GOALS = {"region_sweep_s_per_sample": Goal("≤", 10.0), "train_step_s": Goal("≤", 0.5),
         "train_peak_memory_gb": Goal("≤", 40.0), "edited_over_unedited": Goal("≤", 1.10)}
GOAL_BACKBONES = {"region_sweep_s_per_sample": {"llava"}}
# The official LLaVA E-VQA run (qizhou000/VisEdit: README `vead_train.py -mn llava -dna EVQA -bs 4`, its
# default --epochs 1000 over the whole training file) on MMEdit's E-VQA training split, 6,346 records as the
# MMEdit paper (Cheng et al., 2023) reports it (the file is not read here). The script trains until stopped or
# out of epochs, checkpointing every 1,000 steps, so the projection gives one epoch and the script's default.
OFFICIAL_RECORDS, OFFICIAL_BATCH, OFFICIAL_EPOCHS = 6346, 4, 1000
# What each backbone reports in bench_gpu.json (the test checks every one).
FIELDS = ("device_name", "dtype", "size", "parameters", "n_layers", "samples", "build_s",
          "contribution_s_per_sample", "sweep_method", "grid_site", "grid", "n_regions", "sweep_layers",
          "region_sweep_s_per_sample", "sweep_finite", "placement", "adapter_parameters", "train_batch",
          "train_steps_timed", "train_step_s", "train_step_each_s", "products_s", "peak_memory_bytes",
          "peak_memory_kind", "train_peak_memory_gb", "forward_repeats", "forward_unedited_s",
          "forward_edited_s", "edited_over_unedited", "edit_changes_output", "goals")


# ---- clocks and memory ---------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read after it covers the work (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn()`` took, GPU work included, and what it returned."""
    _synchronize(device)
    began = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - began, result


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak; False where the kernel does not allow resetting the peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()


def peak_memory(device: torch.device, was_reset: bool) -> tuple[int, str]:
    """Peak bytes since the last reset (since the process started where ``was_reset`` is False), and what
    was measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    since = "" if was_reset else ", since the process started (the peak could not be reset)"
    return int(peak_rss_mb() * 2**20), f"peak RSS of the process (VmHWM){since}"


# ---- the model and the records -------------------------------------------------------------------------

def build(name: str, size: str, device: torch.device, dtype: torch.dtype) -> Backbone:
    """Backbone ``name`` at ``size`` ("full" | "reduced"), random weights (seed 0) allocated in ``dtype`` on
    ``device`` (a 7B model built in fp32 first would need twice the memory), with the world's tokenizer."""
    from transformers import AutoTokenizer

    from attrib.defaults import DEFAULTS_DIR

    spec = get_spec(name)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULTS_DIR / name, local_files_only=True)
    config = full_config(name, tokenizer) if size == "full" else CONFIG_BUILDERS[name](REDUCED_SIZES, tokenizer)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, spec.model_class)(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return Backbone(model, build_processor(spec, config, tokenizer), spec)


def _on_model(backbone: Backbone, inputs):
    """``inputs`` on the model's device with the pixels in its dtype, as `contribution` prepares them."""
    inputs = inputs.to(backbone.model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(backbone.model.dtype)
    return inputs


# ---- the measurements ----------------------------------------------------------------------------------

def measure_attribution(backbone: Backbone, records: Sequence[EditRecord], device: torch.device,
                        progress: bool) -> dict[str, Any]:
    """Seconds per sample of the contribution pass and of the region sweep over every LM layer."""
    from attrib.contribution import contribution
    from attrib.prompts import load_prompts
    from attrib.regions import AttentionNoise, VitNoise, lm_regions, region_sweep, vit_regions

    prompts = [load_prompts()["vqa"].format(src=r.src) for r in records]
    images = [r.load_image("image") for r in records]

    def contribute(i: int) -> Any:
        return contribution(backbone, images[i:i + 1], prompts[i:i + 1], batch_size=1, progress=False)

    timed(partial(contribute, 0), device)  # warm-up
    contribution_s = [timed(partial(contribute, i), device)[0] for i in range(len(records))]

    lm_grid = backbone.spec.grid_site == "lm"
    method = AttentionNoise() if lm_grid else VitNoise()  # the official settings (class defaults)
    regions = lm_regions(backbone) if lm_grid else vit_regions(backbone)
    layers = list(range(backbone.n_layers))

    def sweep(n: int, swept: list[int], bar: bool) -> Any:
        return region_sweep(backbone, images[:n], prompts[:n], method, regions, swept, batch_size=1, progress=bar)

    timed(lambda: sweep(1, layers[:1], False), device)  # warm-up
    sweep_s, result = timed(lambda: sweep(len(records), layers, progress), device)
    return {"contribution_s_per_sample": statistics.mean(contribution_s), "sweep_method": method.describe(),
            "grid_site": regions.site, "grid": list(regions.shape), "n_regions": regions.n_regions,
            "sweep_layers": layers, "region_sweep_s_per_sample": sweep_s / len(records),
            "sweep_finite": bool(torch.isfinite(result.maps).all())}


def measure_editing(name: str, backbone: Backbone, records: Sequence[EditRecord], device: torch.device,
                    train_steps: int, repeats: int, progress: bool) -> dict[str, Any]:
    """The VEAD + IM training step at batch 4 with its peak memory, then edited vs unedited forwards. The
    first timed step also holds the run's set-up (optimizer, the scene gate's reference states: a forward of
    the records' images), a small share beside a step's forwards and backward."""
    from editing.adapter.vead import count_parameters, lm_width
    from editing.adapter.visedit import EditPlacement, VisEditEditor
    from editing.editor import EditRequest
    from editing.training.config import TrainConfig
    from editing.training.loop import train
    from editing.training.recipe import default_lr, sized_vead_config

    edit_layer, it_layers = paper_layers(name, backbone.n_layers)
    placement = EditPlacement(edit_layer, tuple(it_layers), edit_layer)
    width = lm_width(backbone.config)
    editor = VisEditEditor(backbone, placement, sized_vead_config(width, scene_gate=True, target_role=True))
    try:
        config = TrainConfig(steps=train_steps, batch_size=TRAIN_BATCH, lr=default_lr(width))
        train(editor, records, replace(config, steps=1), progress=False)  # warm-up
        gc.collect()
        was_reset = reset_peak_memory(device)
        step_ends: list[float] = []

        def step_end(step: int, losses: dict[str, float]) -> None:
            _synchronize(device)
            step_ends.append(time.perf_counter())

        _synchronize(device)
        began = time.perf_counter()
        trained = train(editor, records, config, progress=progress, on_step=step_end)
        peak_bytes, peak_kind = peak_memory(device, was_reset)
        step_s = [end - start for start, end in zip([began, *step_ends], step_ends)]

        request = EditRequest.from_record(records[0])
        inputs = _on_model(backbone, backbone.encode([request.image], [request.prompt]))

        @torch.no_grad()
        def forward() -> torch.Tensor:
            return backbone.forward(inputs).logits[0, -1]

        unedited_logits = forward()  # warm-up, unedited
        editor.edit(request)
        edited_logits = forward()  # warm-up, edited
        edited, unedited = [], []
        for _ in range(repeats):  # in turns, so a slow spell of the machine hits both
            editor.edit(request)
            edited.append(timed(forward, device)[0])
            editor.restore()
            unedited.append(timed(forward, device)[0])
    finally:
        editor.remove()
    forward_edited, forward_unedited = statistics.median(edited), statistics.median(unedited)
    return {"placement": placement.to_json(), "adapter_parameters": count_parameters(editor.adapter),
            "train_batch": TRAIN_BATCH, "train_steps_timed": len(step_s),
            "train_step_s": (sum(step_s) - trained.products_s) / len(step_s), "train_step_each_s": step_s,
            "products_s": trained.products_s, "peak_memory_bytes": peak_bytes, "peak_memory_kind": peak_kind,
            "train_peak_memory_gb": peak_bytes / 1e9, "forward_repeats": repeats,
            "forward_unedited_s": forward_unedited, "forward_edited_s": forward_edited,
            "edited_over_unedited": forward_edited / forward_unedited,
            "edit_changes_output": not torch.equal(edited_logits, unedited_logits)}


def goals(name: str, size: str, row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal that applies to ``name`` with its value; ``met`` is None below full size (no verdict)."""
    # A goal not in GOAL_BACKBONES applies to every backbone.
    return {key: {"value": row[key], "goal": str(goal), "met": goal.met(row[key]) if size == "full" else None}
            for key, goal in GOALS.items() if name in GOAL_BACKBONES.get(key, {name})}


def bench_backbone(name: str, size: str, device: torch.device, dtype: torch.dtype, records: Sequence[EditRecord],
                   train_steps: int, repeats: int, progress: bool) -> dict[str, Any]:
    """Build backbone ``name`` and run the four measurements (module docstring); returns its report row."""
    build_s, backbone = timed(lambda: build(name, size, device, dtype), device)
    row: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "size": size,
        "parameters": sum(p.numel() for p in backbone.model.parameters()), "n_layers": backbone.n_layers,
        "samples": len(records), "build_s": build_s}
    row.update(measure_attribution(backbone, records, device, progress))
    row.update(measure_editing(name, backbone, records, device, train_steps, repeats, progress))
    row["goals"] = goals(name, size, row)
    return row


def projection(step_s: float) -> dict[str, Any]:
    """Wall time of the official LLaVA E-VQA schedule (`OFFICIAL_RECORDS`) and the toolkit's default at
    ``step_s`` seconds a step."""
    from editing.training.recipe import default_steps

    per_epoch = math.ceil(OFFICIAL_RECORDS / OFFICIAL_BATCH)
    return {"step_s": step_s, "records": OFFICIAL_RECORDS, "batch_size": OFFICIAL_BATCH, "steps_per_epoch": per_epoch,
            "epoch_h": per_epoch * step_s / 3600, "official_epochs": OFFICIAL_EPOCHS,
            "official_h": OFFICIAL_EPOCHS * per_epoch * step_s / 3600,
            "toolkit_steps": default_steps("llava"), "toolkit_h": default_steps("llava") * step_s / 3600,
            "source": "qizhou000/VisEdit vead_train.py defaults (-bs 4 from its README, --epochs 1000, the whole "
                      "training file); E-VQA train = 6,346 records as the MMEdit paper reports it (not read "
                      "from a file)"}


def run_bench_gpu(backbones: Sequence[str], out: Path, size: str = "full", device: str | None = None,
                  dtype: torch.dtype = torch.bfloat16, samples: int = TRAIN_BATCH, train_steps: int = 10,
                  repeats: int = 10, progress: bool = True) -> dict[str, Any]:
    """Measure each of ``backbones`` in turn (module docstring); returns what it writes to
    ``out/bench_gpu.json``. ``device`` None: cuda when there is one, else cpu."""
    for name in backbones:
        get_spec(name)
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if samples < TRAIN_BATCH or train_steps < 1 or repeats < 1:
        raise ValueError(f"need samples ≥ {TRAIN_BATCH} (one training batch), train_steps ≥ 1 and repeats ≥ 1")
    place = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if place.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {place}: no GPU is visible to this process (use --device cpu --size reduced)")
    began = time.perf_counter()
    with OutputLock(out):
        records, data = world_records(out, samples)
        rows = {}
        for name in tqdm(backbones, desc="bench-gpu", disable=not progress or len(backbones) == 1):
            rows[name] = bench_backbone(name, size, place, dtype, records, train_steps, repeats, progress)
            gc.collect()  # the next backbone needs this one's memory
            if place.type == "cuda":
                torch.cuda.empty_cache()
        report = {"device": str(place), "size": size, "dtype": str(dtype).removeprefix("torch."),
                  "data": stored_path(data), "records": [r.index for r in records], "backbones": rows,
                  "projection": projection(rows["llava"]["train_step_s"]) if "llava" in rows else None,
                  "wall_s": time.perf_counter() - began, "torch": torch.__version__,
                  "transformers": transformers.__version__, "threads": torch.get_num_threads()}
        atomic_write_text(out / "bench_gpu.json", json.dumps(report, indent=2) + "\n")
    return report


# ---- the command ---------------------------------------------------------------------------------------

def format_table(report: dict[str, Any]) -> str:
    """One column per backbone, each figure with its goal; then the projection of the official run."""
    rows = report["backbones"]
    names = list(rows)
    first = rows[names[0]]
    verdict = {True: " ok", False: " MISSED", None: ""}
    lines = [f"bench-gpu: {first['device_name']}, {report['dtype']}, {report['size']} size "
             f"(goals: full size on one H100-class GPU)",
             f"{'figure':<34}" + "".join(f"{name:>16}" for name in names) + "  goal"]

    def line(label: str, key: str, shown: Callable[[Any], str]) -> None:
        goal = GOALS.get(key)
        cells = []
        for name in names:
            mark = rows[name]["goals"].get(key, {}).get("met")
            cells.append(f"{shown(rows[name][key]) + verdict[mark]:>16}")
        lines.append(f"{label:<34}" + "".join(cells) + (f"  {goal}" if goal else ""))

    line("parameters", "parameters", lambda v: f"{v / 1e9:.3g} B" if v >= 1e9 else f"{v / 1e6:.3g} M")
    line("grid", "grid", lambda v: "×".join(map(str, v)))
    line("contribution (s / sample)", "contribution_s_per_sample", lambda v: f"{v:.3g}")
    line("region sweep, all layers (s / sample)", "region_sweep_s_per_sample", lambda v: f"{v:.3g}")
    line(f"train step, batch {TRAIN_BATCH} (s)", "train_step_s", lambda v: f"{v:.3g}")
    line("train peak memory (GB, 1e9 B)", "train_peak_memory_gb", lambda v: f"{v:.3g}")
    line("edited / unedited forward", "edited_over_unedited", lambda v: f"{v:.3f}")
    lines.append(f"sweep goal applies to llava only; peak memory: {first['peak_memory_kind']}; "
                 f"{first['train_steps_timed']} training steps, {first['forward_repeats']} forward pairs timed")
    plan = report["projection"]
    if plan is not None:
        lines.append(f"llava training at {plan['step_s']:.3g} s / step: one E-VQA epoch ({plan['records']:,} "
                     f"records / batch {plan['batch_size']} = {plan['steps_per_epoch']:,} steps) "
                     f"{plan['epoch_h']:.3g} h; the official script's {plan['official_epochs']:,} epochs "
                     f"{plan['official_h']:.3g} h; the toolkit's {plan['toolkit_steps']:,} steps "
                     f"{plan['toolkit_h']:.3g} h" + ("" if report["size"] == "full" else " (reduced size)"))
    return "\n".join(lines)


def bench_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="all",
                        help="llava | blip2 | minigpt4, a comma-separated list, or all (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-gpu"), help="folder for bench_gpu.json")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="the backbone's dtype")
    parser.add_argument("--size", default="full", choices=SIZES,
                        help="full: the published architectures; reduced: 4 LM layers, 64 wide (CPU checks)")
    parser.add_argument("--samples", type=int, default=TRAIN_BATCH,
                        help=f"records timed per attribution step, and trained on (≥ {TRAIN_BATCH})")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=10, help="edited / unedited forward pairs timed")


def bench_gpu(args: argparse.Namespace) -> int:
    """Measure the backbones, print the table, write OUT/bench_gpu.json."""
    names = list(BACKBONES) if args.backbone == "all" else [n.strip() for n in args.backbone.split(",") if n.strip()]
    report = run_bench_gpu(names, args.out, args.size, args.device, DTYPES[args.dtype], args.samples,
                           args.train_steps, args.repeats, progress=not args.no_progress)
    print(format_table(report))
    print(f"wrote {args.out / 'bench_gpu.json'}")
    return 0
