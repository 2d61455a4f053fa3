"""The attribution side of the ``visedit`` command line: world, heatmaps, validate, train-defaults,
convert-minigpt4. Each command is a pair: ``<name>_arguments(parser)`` declares its options and
``<name>(args) -> int`` runs it; `visedit.cli` puts them together. Errors are raised (DataError, OSError,
ValueError) and printed by the command line as one line.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from attrib.backbones.placement import DEVICE_HELP, DTYPE_HELP
from attrib.config import AttributionConfig
from attrib.data import DataError
from attrib.io import OutputLock
from attrib.parallel import main_first, processes

WORLD = Path("runs/world")  # the default data: `visedit world --seed 1 --out runs/world` (make writes it)
DEFAULT_DATA = WORLD / "vqa_eval.json"
BACKBONES = "llava | blip2 | minigpt4"
WORK = "work"  # the folder under OUT where `heatmaps` keeps finished attribution chunks until it is done


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--backbone, --model, --device and --dtype, as every command that loads a backbone takes them."""
    parser.add_argument("--backbone", default="llava", help=BACKBONES)
    parser.add_argument("--model", type=Path, default=None,
                        help="local Hugging Face folder (default: the shipped default of --backbone)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)


def _data_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MMEdit JSON file")
    parser.add_argument("--images", type=Path, default=None, help="image root (default: the data file's folder)")
    parser.add_argument("--n", type=int, default=24, help="number of records (the first N)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every noise draw (recorded in the outputs)")
    parser.add_argument("--batch-size", type=int, default=AttributionConfig.batch_size,
                        help="samples per forward batch (smaller: less memory)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {out})")


def _load(args: argparse.Namespace):
    """The backbone and the first ``--n`` records of ``--data`` an attribution command runs on."""
    from attrib.backbones.placement import resolve_placement
    from attrib.data import load_records
    from attrib.defaults import load_model

    resolve_placement(args.device, args.dtype)  # a --device / --dtype this machine cannot take: said first
    if args.data == DEFAULT_DATA and not DEFAULT_DATA.is_file():
        raise DataError(f"{DEFAULT_DATA}: the world data is not there; write it with `visedit world --seed 1 "
                        f"--out {WORLD}` (make does) or pass --data")
    backbone = load_model(args.backbone, args.model, args.device, args.dtype)
    records = load_records(args.data, args.images, n=args.n)
    return backbone, records


# ---- world ---------------------------------------------------------------------------------------------

def world_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, required=True, help="world seed (>= 0); same seed, same bytes")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--n-train", type=int, default=None,
                        help="records in vqa_train and caption_train (default: 3000 and 1000)")
    parser.add_argument("--n-eval", type=int, default=None,
                        help="records in vqa_eval and caption_eval (default: 1000 and 300)")
    parser.add_argument("--novel-share", type=float, default=None,
                        help="share of eval VQA edits with a novel target word (default 1/3)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")


def world(args: argparse.Namespace) -> int:
    """Write the synthetic world's MMEdit datasets (JSON records, PNG images, truth.json) from one seed."""
    from attrib.world import write_world

    counts = {}
    if args.n_train is not None:
        counts.update(n_train=args.n_train, n_caption_train=args.n_train)
    if args.n_eval is not None:
        counts.update(n_eval=args.n_eval, n_caption_eval=args.n_eval)
    if args.novel_share is not None:
        counts.update(novel_share=args.novel_share)
    start = time.perf_counter()
    try:
        out = write_world(args.out, args.seed, overwrite=args.overwrite, **counts)
    except PermissionError as e:
        raise OSError(f"cannot write {args.out}: {e.strerror or e} ({e.filename or args.out.parent})") from None
    except (FileExistsError, ValueError):
        raise
    except OSError as e:
        raise OSError(f"writing {args.out} failed: {e.strerror or e}") from None
    print(f"wrote world seed={args.seed} to {out} in {time.perf_counter() - start:.1f} s")
    return 0


# ---- heatmaps ------------------------------------------------------------------------------------------

def heatmaps_arguments(parser: argparse.ArgumentParser) -> None:
    _data_arguments(parser, "runs/heatmaps/<backbone>")


def heatmaps(args: argparse.Namespace) -> int:
    """Contribution bars, region heatmaps per method, overlays, the artifact and the placement."""
    from attrib.attribution import run_attribution

    started = time.time()
    out = args.out or Path("runs/heatmaps") / args.backbone
    procs = processes()  # under `accelerate launch` the chunks are shared out; the main process writes
    with main_first(OutputLock(out)):
        backbone, records = _load(args)
        work = out / WORK  # finished chunks: a killed run started again resumes from them
        config = AttributionConfig(seed=args.seed, batch_size=args.batch_size)
        attribution = run_attribution(backbone, records, config, dataset=str(args.data), progress=not args.no_progress,
                                      work=work)
        if not procs.main:
            return 0
        attribution.save(out)
        figures = attribution.plot_all(out)
        shutil.rmtree(work, ignore_errors=True)
    placement = attribution.placement
    print(f"{args.backbone}: {len(records)} samples, edit layer {placement.edit_layer}, IT layers "
          f"{placement.it_layers[0]}–{placement.it_layers[-1]}; {len(figures)} figures and the artifact in {out} "
          f"({time.time() - started:.0f} s)")
    return 0


# ---- validate ------------------------------------------------------------------------------------------

def validate_arguments(parser: argparse.ArgumentParser) -> None:
    _data_arguments(parser, "runs/validate/<backbone>")
    parser.add_argument("--ig-steps", type=int, default=16, help="integration steps of the captum baselines")
    parser.add_argument("--all-answers", action="store_true", help="also score samples the model answers wrongly")
    parser.add_argument("--min-objects", type=int, default=None, help="only scenes with at least this many objects")


def validate(args: argparse.Namespace) -> int:
    """Score every region method and baseline against the world's truth boxes."""
    from attrib.validation import validate as run_validation
    from attrib.validation import write_validation

    out = args.out or Path("runs/validate") / args.backbone
    with OutputLock(out):
        backbone, records = _load(args)
        config = AttributionConfig(seed=args.seed, batch_size=args.batch_size)
        result = run_validation(backbone, records, config, args.ig_steps,
                                correct_only=not args.all_answers, min_objects=args.min_objects,
                                progress=not args.no_progress)
        write_validation(result, out)
    best = max(result.methods, key=lambda name: result.methods[name]["best_pointing_game"])
    print(f"{args.backbone}: {result.n_samples} samples; best pointing game {best} "
          f"{result.methods[best]['best_pointing_game']:.1f}% (random cell {result.baselines['random_cell']:.1f}%); "
          f"{out / 'validation.json'}")
    return 0


# ---- train-defaults ------------------------------------------------------------------------------------

def train_defaults_arguments(parser: argparse.ArgumentParser) -> None:
    from attrib.defaults.recipe import DEFAULT_CHAIN
    from attrib.defaults.train import DEFAULT_OUT, DEFAULT_WORK

    parser.add_argument("--backbones", default=",".join(DEFAULT_CHAIN),
                        help="comma-separated defaults, trained in this order")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where the model folders go (attrib/defaults/models: replace the shipped ones)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints (a killed run resumes)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--eval-only", action="store_true",
                        help="only re-measure the models in --out and record it in their manifest.json")


def train_defaults(args: argparse.Namespace) -> int:
    """Train (resumably) and measure the default models; write the held-out accuracies to each manifest."""
    from attrib.defaults.evaluate import evaluate_default
    from attrib.defaults.recipe import RECIPES
    from attrib.defaults.train import train_default, write_manifest_metrics

    names = args.backbones.split(",")
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        raise ValueError(f"unknown default {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    with OutputLock(args.work):  # the checkpoints; each model folder is locked while it is written
        for name in names:
            out_dir = args.out / name if args.eval_only else train_default(name, args.out, args.work,
                                                                           scale=args.scale)
            metrics = evaluate_default(RECIPES[name].backbone, out_dir)
            write_manifest_metrics(out_dir, metrics)
            print(name, metrics)
    return 0


# ---- convert-minigpt4 ----------------------------------------------------------------------------------

def convert_minigpt4_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, help_text in (("--vit-qformer", "LAVIS BLIP-2 checkpoint, e.g. blip2_pretrained_flant5xxl.pth"),
                            ("--minigpt4", "MiniGPT-4 checkpoint with llama_proj"),
                            ("--vicuna", "Vicuna-7B v0 HF folder (weights + tokenizer)"), ("--out", "output folder")):
        parser.add_argument(flag, required=True, help=help_text)
    parser.add_argument("--eva-vit", help="eva_vit_g.pth, when the BLIP-2 checkpoint has no visual_encoder.* keys")
    parser.add_argument("--num-query-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--vision-heads", type=int, help="ViT heads (default: width / 88, as EVA ViT-g)")
    parser.add_argument("--qformer-heads", type=int, help="Q-Former heads (default: width / 64, as BERT-base)")


def convert_minigpt4(args: argparse.Namespace) -> int:
    """Convert the original MiniGPT-4 files into a folder ``load_backbone("minigpt4", ...)`` reads."""
    import logging

    import torch

    from attrib.backbones.minigpt4 import convert_minigpt4 as convert

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = convert(args.vit_qformer, args.minigpt4, args.vicuna, args.out, eva_vit=args.eva_vit,
                  num_query_tokens=args.num_query_tokens, image_size=args.image_size,
                  dtype=getattr(torch, args.dtype), vision_heads=args.vision_heads, qformer_heads=args.qformer_heads)
    print(f"wrote {out}; load it with load_backbone('minigpt4', {str(out)!r})")
    return 0
