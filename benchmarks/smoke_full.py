"""`make smoke-full`: the toolkit at the real backbone sizes, on random weights, on a CPU.

What it is for: the code paths that only show at scale — bf16 end to end, 32-layer tracing, 576-token grids,
the 1408-wide EVA ViT-g and 32-query Q-Former, the 34.65 M / 22.05 M-parameter adapters at the official edit
layers — exercised before a user with a real checkpoint does. Not a test: LLaVA-1.5-7B and MiniGPT-4 need
~16 GB of RAM and a ~14 GB folder on disk; the tests cover the same code on tiny models.

    visedit smoke-full --backbone llava [--out runs/full-llava]      # make smoke-full BACKBONE=llava

1. writes, once, a random-initialised full-size Hugging Face folder in bf16 safetensors (`full_size_folder`):
   LLaVA-1.5-7B, BLIP-2 OPT-2.7B, or MiniGPT-4 (EVA ViT-g + Q-Former + Vicuna-7B, in the layout
   `convert_minigpt4` writes). The world's tokenizer stands in for the real one (their ids are a subset of the
   full vocabulary), so the embedding tables keep their real sizes.
2. loads it with ``load_backbone(name, folder, dtype=torch.bfloat16)`` and, on 2 world records: the
   contribution pass; a region sweep at one band of three layers over the full grid (24 × 24 LM visual tokens,
   or 16 × 16 ViT patches); the attribution artifact, whose placement is the paper's edit layer (on random
   weights the visual patching ceiling cannot be measured: the model reads no counterfactual image, and the
   contribution rule's layer is arbitrary); two VEAD + IM training steps with the adapter sized as at full
   scale (fp32 master weights on the bf16 backbone); one edit, its evaluation on the 2 records (edit → measure
   → restore, the restore checked bit-exact after each).
3. writes ``smoke.json``: per step the wall time, the peak RSS, and what was checked (dtypes, visual positions,
   grid, parameter counts).

Peak RSS per step is the process's high-water mark (VmHWM), reset before each step where the kernel allows it
(``/proc/self/clear_refs``), so it says what that step needed with the model loaded.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from attrib.backbones.loader import Backbone, load_backbone
from attrib.backbones.spec import get_spec
from attrib.io import OutputLock, atomic_write_text, stored_path

# The real vocabularies (LLaVA-1.5's with its image token and padding, OPT's, Vicuna's with MiniGPT-4's image
# token) and the official edit layers and influence-target layers of the VisEdit paper's code.
FULL_VOCAB = {"llava": 32064, "blip2": 50272, "minigpt4": 32001}
PAPER_LAYERS = {"llava": (18, range(19, 31)), "blip2": (19, range(20, 31)), "minigpt4": (17, range(18, 31))}
N_RECORDS = 2


@dataclass
class Step:
    name: str
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    checks: dict[str, Any] = field(default_factory=dict)


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:  # a kernel control file, not an output
            handle.write("5")
        return True
    except OSError:
        return False


@contextmanager
def measured(steps: list[Step], name: str) -> Iterator[Step]:
    """Time a step and record its peak RSS; the step's ``checks`` are filled by the caller."""
    step = Step(name)
    step.checks["peak_rss_reset"] = reset_peak_rss()
    began = time.perf_counter()
    try:
        yield step
    finally:
        step.wall_s = round(time.perf_counter() - began, 2)
        step.peak_rss_mb = round(peak_rss_mb(), 1)
        steps.append(step)


# ---- the full-size folder ------------------------------------------------------------------------------

def full_config(name: str, tokenizer):
    """The published architecture of backbone ``name`` (`attrib.backbones.reference`), its LM's special and
    image token ids taken from ``tokenizer`` and its vocabulary kept at the real size. MiniGPT-4's is the
    config `convert_minigpt4` writes for the real EVA ViT-g, Q-Former and Vicuna-7B."""
    from attrib.backbones.minigpt4 import SourceSizes, blip2_config
    from attrib.backbones.reference import reference_config
    from attrib.backbones.spec import IMAGE_PLACEHOLDER

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    config = reference_config(name)
    text = config.text_config
    text.vocab_size = FULL_VOCAB[name]
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                              tokenizer.eos_token_id)
    if name == "minigpt4":
        vision, qformer = config.vision_config, config.qformer_config
        sizes = SourceSizes(vit_width=vision.hidden_size, vit_mlp=vision.intermediate_size,
                            patch_size=vision.patch_size, vit_tokens=(vision.image_size // vision.patch_size) ** 2 + 1,
                            vit_layers=vision.num_hidden_layers, qformer_width=qformer.hidden_size,
                            qformer_mlp=qformer.intermediate_size, num_query_tokens=config.num_query_tokens,
                            qformer_layers=qformer.num_hidden_layers,
                            cross_attention_frequency=qformer.cross_attention_frequency, lm_width=text.hidden_size)
        return blip2_config(sizes, text, vision.image_size, image_token_id)
    config.image_token_id = image_token_id
    return config


def _build(name: str, folder: str) -> None:
    """Write the random-initialised bf16 folder of ``name`` (run in a child process: `full_size_folder`)."""
    import transformers
    from transformers import AutoTokenizer

    from attrib.backbones.build import build_processor, save_backbone
    from attrib.defaults import DEFAULTS_DIR

    spec = get_spec(name)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULTS_DIR / name, local_files_only=True)
    config = full_config(name, tokenizer)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate every weight in bf16: a 7B model in fp32 would not fit
    try:
        model = getattr(transformers, spec.model_class)(config).eval()
    finally:
        torch.set_default_dtype(previous)
    processor = build_processor(spec, config, tokenizer)
    manifest = {"backbone": name, "prompt_template": spec.prompt_template, "text_template": spec.text_template,
                "random_init": "full-size architecture, random weights (seed 0), bf16; the world's tokenizer"}
    save_backbone(model, processor, folder, manifest)  # built beside it, renamed into place


def full_size_folder(name: str, folder: Path) -> tuple[Path, float]:
    """The full-size folder of ``name`` at ``folder``, written first when it is not there (in a child process,
    so this process's memory holds only the loaded model later); returns it and the seconds spent writing."""
    if (folder / "config.json").is_file():
        return folder, 0.0
    folder.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=_build, args=(name, str(folder)))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{folder}: writing the full-size {name} folder failed (exit code {child.exitcode})")
    return folder, round(time.perf_counter() - began, 1)


# ---- the run ---------------------------------------------------------------------------------------------

def _dtypes(module: torch.nn.Module) -> dict[str, int]:
    """Parameter count per dtype."""
    counts: Counter = Counter()
    for parameter in module.parameters():
        counts[str(parameter.dtype).removeprefix("torch.")] += parameter.numel()
    return dict(counts)


def _meta_parameters(build) -> int:
    """Parameters of the module ``build()`` makes, built on the meta device (no memory)."""
    from editing.adapter.vead import count_parameters

    with torch.device("meta"):
        return count_parameters(build())


def world_records(out: Path, n: int) -> tuple[list, Path]:
    """``n`` world E-VQA records with a truth box, from the first ``max(16, 4n)``: the default world's, or a
    small world written into ``out``."""
    from attrib.commands import DEFAULT_DATA
    from attrib.data import load_records
    from attrib.world import write_world

    pool = max(16, 4 * n)
    data = DEFAULT_DATA
    if not data.is_file():
        world = out / "world"
        if not (world / "vqa_eval.json").is_file():
            write_world(world, seed=1, n_train=8, n_eval=pool, n_caption_train=1, n_caption_eval=1, overwrite=True)
        data = world / "vqa_eval.json"
    records = [r for r in load_records(data, n=pool) if r.box("image") is not None][:n]
    if len(records) < n:
        raise ValueError(f"{data}: {len(records)} records with a truth box among the first {pool}; {n} needed")
    return records, data


def _attribute(backbone: Backbone, records, steps: list[Step], band: list[int], draws: int, progress: bool):
    """The contribution pass and a region sweep at ``band`` over the full grid; returns both results."""
    from attrib.contribution import contribution
    from attrib.prompts import load_prompts
    from attrib.regions import AttentionNoise, VitNoise, lm_regions, region_sweep, vit_regions

    prompts = [load_prompts()["vqa"].format(src=r.src) for r in records]
    images = [r.load_image("image") for r in records]
    with measured(steps, "contribution") as step:
        contrib = contribution(backbone, images, prompts, batch_size=len(prompts), progress=progress)
        gap = (contrib.dla_embed + contrib.dla_attn.sum(1) + contrib.dla_mlp.sum(1) + contrib.dla_bias
               - contrib.logit).abs().max().item()
        step.checks.update(samples=len(prompts), layers=contrib.n_layers, dla_sum_minus_logit=round(gap, 5))
    lm_grid = backbone.spec.grid_site == "lm"
    method = AttentionNoise(draws=draws, seed=0) if lm_grid else VitNoise(draws=draws, seed=0)
    regions = lm_regions(backbone) if lm_grid else vit_regions(backbone)
    with measured(steps, "region_sweep") as step:
        result = region_sweep(backbone, images, prompts, method, regions, band, batch_size=1, progress=progress)
        step.checks.update(method=method.describe(), grid=list(regions.shape), window=regions.window, layers=band,
                           maps=list(result.maps.shape), finite=bool(torch.isfinite(result.maps).all()))
    return contrib, result, images


def paper_layers(name: str, n_layers: int) -> tuple[int, list[int]]:
    """The paper's edit layer and influence-target layers for ``name``, clipped to a model of ``n_layers``
    (the full-size models have 32; smaller test models keep the same code path)."""
    edit_layer, it_layers = PAPER_LAYERS[name]
    edit_layer = min(edit_layer, n_layers - 2)
    return edit_layer, [layer for layer in it_layers if edit_layer < layer < n_layers] or [edit_layer + 1]


def _artifact(name: str, backbone: Backbone, records, contrib, result, images, out: Path, steps: list[Step]):
    """The attribution artifact with the paper's placement, and the `EditPlacement` read back from it."""
    from attrib.attribution import Attribution
    from attrib.config import AttributionConfig
    from attrib.placement import place_edit
    from editing.adapter.visedit import EditPlacement

    edit_layer, it_layers = paper_layers(name, backbone.n_layers)
    with measured(steps, "placement") as step:
        mean = contrib.mean()
        by_contribution = place_edit(mean["attn"], mean["mlp"])  # no ceiling: the contribution rule alone
        placement = replace(by_contribution, edit_layer=edit_layer, it_layers=list(it_layers), im_read_layer=edit_layer,
                            contribution_edit_layer=by_contribution.edit_layer,
                            note="the paper's layers: on random weights the visual patching ceiling cannot be measured")
        attribution = Attribution(name, str(backbone.path), backbone.fingerprint(), "world E-VQA", records, contrib,
                                  {result.method: result}, result.method, placement, AttributionConfig(), images)
        folder = attribution.save(out / "attribution")
        edit_placement = EditPlacement.from_artifact(folder, backbone)
        step.checks.update(source="the paper's layers (the ceiling cannot be measured on random weights)",
                           edit_layer=edit_placement.edit_layer, im_read_layer=edit_placement.read_layer,
                           it_layers=[min(it_layers), max(it_layers)],
                           contribution_rule_edit_layer=by_contribution.edit_layer,
                           artifact=stored_path(folder / "attribution.json"))
    return edit_placement


def _edit(backbone: Backbone, records, placement, steps: list[Step], train_steps: int, progress: bool) -> None:
    """VEAD + IM sized as at full scale: ``train_steps`` training steps, one edit, its evaluation on the
    records (bit-exact restore checked after each edit), and one more restore check of our own."""
    from editing.adapter.vead import EditAdapter, count_parameters, lm_width
    from editing.adapter.visedit import VisEditEditor
    from editing.editor import EditRequest
    from editing.evaluation.evaluate import evaluate_edits
    from editing.training.config import TrainConfig
    from editing.training.loop import train
    from editing.training.recipe import default_lr, sized_vead_config

    width = lm_width(backbone.config)
    config = sized_vead_config(width, scene_gate=True, target_role=True)
    editor = VisEditEditor(backbone, placement, config)
    try:
        step_ends: list[float] = []
        with measured(steps, "train") as step:
            began = time.perf_counter()
            # One record a step; the layers above the edit site one row at a time (the autograd graph of a
            # 600-token row through 13 layers of a 7B model is ~1 GB); only the products the steps use.
            train_config = TrainConfig(steps=train_steps, batch_size=1, lr=default_lr(width), rows_per_backward=1,
                                       product_chunk=1)
            trained = train(editor, records, train_config, progress=progress,
                            on_step=lambda i, losses: step_ends.append(time.perf_counter()))
            times = [end - start for start, end in zip([began, *step_ends], step_ends)]
            step.checks.update(
                adapter=config.to_json(), adapter_parameters=count_parameters(editor.adapter),
                paper_parameters=_meta_parameters(lambda: EditAdapter(width, sized_vead_config(width))),
                adapter_dtypes=_dtypes(editor.adapter), steps=trained.steps,
                train_config=train_config.to_json(), step_s=[round(t, 1) for t in times],
                products_s=round(trained.products_s, 1),
                step_s_without_products=round((sum(times) - trained.products_s) / max(1, len(times)), 1),
                losses=[{k: round(v, 4) for k, v in h.items()} for h in trained.history],
                finite=all(all(v == v and abs(v) != float("inf") for v in h.values()) for h in trained.history))
        request = EditRequest.from_record(records[0])
        inputs = backbone.encode([request.image], [request.prompt])
        with torch.no_grad():
            before = backbone.forward(inputs).logits[0, -1]
        with measured(steps, "edit") as step:
            signal = editor.edit(request)
            step.checks.update(edit_states=list(signal.states.shape), states_dtype=str(signal.states.dtype))
        with torch.no_grad():
            edited = backbone.forward(inputs).logits[0, -1]
        editor.restore()
        with torch.no_grad():
            restored = backbone.forward(inputs).logits[0, -1]
        steps[-1].checks.update(edit_changes_the_logits=not torch.equal(edited, before),
                                restore_bit_exact=torch.equal(restored, before))
        with measured(steps, "evaluate") as step:
            scores = evaluate_edits(editor, records, progress=progress).to_json()
            step.checks.update(n_eval=scores["n_eval"], **{k: scores[k] for k in ("rel", "t_gen", "m_gen", "t_loc",
                                                                                  "m_loc")},
                               restore_checked_after_each_edit=True)
    finally:
        editor.remove()


def run_smoke(name: str, out: Path, draws: int = 2, train_steps: int = 2, progress: bool = True,
              folder: Path | None = None) -> dict:
    """Build (once) and run the smoke test of backbone ``name`` in ``out`` (module docstring); returns the
    report it writes to ``out/smoke.json``. ``folder``: run on this model folder instead of the full-size
    one (the tests run the same steps on tiny models)."""
    get_spec(name)
    with OutputLock(out):
        return _run_smoke(name, out, draws, train_steps, progress, folder)


def _run_smoke(name: str, out: Path, draws: int, train_steps: int, progress: bool, folder: Path | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    folder, built_s = (folder, 0.0) if folder is not None else full_size_folder(name, out / "model")
    steps: list[Step] = []
    began = time.perf_counter()
    with measured(steps, "load") as step:
        backbone = load_backbone(name, folder, dtype=torch.bfloat16)
        step.checks.update(parameters=sum(p.numel() for p in backbone.model.parameters()),
                           dtypes=_dtypes(backbone.model), layers=backbone.n_layers,
                           width=backbone.config.text_config.hidden_size)
    records, data = world_records(out, N_RECORDS)
    inputs = backbone.encode([records[0].load_image("image")], ["What is it?"])
    steps[-1].checks.update(visual_positions=list(backbone.visual_positions(inputs["input_ids"]).shape),
                            prompt_tokens=int(inputs["input_ids"].shape[1]),
                            grid=list(backbone.spec.grid_shape(backbone.config)))
    edit_layer = paper_layers(name, backbone.n_layers)[0]
    band = [layer for layer in (edit_layer - 1, edit_layer, edit_layer + 1) if 0 <= layer < backbone.n_layers]
    contrib, result, images = _attribute(backbone, records, steps, band, draws, progress)
    placement = _artifact(name, backbone, records, contrib, result, images, out, steps)
    _edit(backbone, records, placement, steps, train_steps, progress)
    by_name = {step.name: step for step in steps}
    report = {
        "backbone": name, "model": stored_path(folder), "data": stored_path(data),
        "records": [r.index for r in records],
        "folder_written_s": built_s, "run_s": round(time.perf_counter() - began, 1),
        "peak_rss_mb": max(step.peak_rss_mb for step in steps),
        "attribution_s_per_sample": round((by_name["contribution"].wall_s + by_name["region_sweep"].wall_s)
                                          / len(records), 1),
        "train_step_s": by_name["train"].checks["step_s_without_products"],
        "steps": [{"name": s.name, "wall_s": s.wall_s, "peak_rss_mb": s.peak_rss_mb, **s.checks} for s in steps],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "smoke.json", json.dumps(report, indent=2) + "\n")
    return report


def smoke_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="llava", help="llava | blip2 | minigpt4")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the full-size model (written once) and smoke.json "
                             "(default: runs/full-<backbone>)")
    parser.add_argument("--draws", type=int, default=2, help="noise draws per region of the region sweep")
    parser.add_argument("--train-steps", type=int, default=2, help="VEAD + IM training steps")


def smoke(args: argparse.Namespace) -> int:
    """Run the full-size smoke test (module docstring; needs ~16 GB of RAM for the 7B backbones)."""
    out = args.out or Path(f"runs/full-{args.backbone}")
    report = run_smoke(args.backbone, out, args.draws, args.train_steps, progress=not args.no_progress)
    for step in report["steps"]:
        print(f"{step['name']:<14} {step['wall_s']:>8.1f} s  peak RSS {step['peak_rss_mb'] / 1024:5.1f} GiB")
    print(f"{args.backbone}: peak RSS {report['peak_rss_mb'] / 1024:.1f} GiB, attribution "
          f"{report['attribution_s_per_sample']} s per sample, training step {report['train_step_s']} s, "
          f"run {report['run_s']} s; {out / 'smoke.json'}")
    return 0
