"""Command line of the editor.

    python -m editing edit --backbone B [--model DIR] [--data vqa|caption] [--train FILE --eval FILE
        --images DIR] [--attribution FILE] [--checkpoint FILE] [--steps N] [--out DIR] [--resume] [--skip-bad]

Trains VEAD + IM at the attribution's placement (running the attribution first when no artifact is
given), evaluates single edits and writes results.json / results.md / adapter.safetensors /
im_maps.png to --out (default runs/<backbone>). With --checkpoint it evaluates that adapter without
training. Errors print one line ("error: ...") and exit with status 2.

    python -m editing scenes --backbone B [--eval FILE] [--n N] [--edit-layer L] [--out FILE]

measures, untrained, how well scene similarity (`editing.scenes`) tells each record's ``image_rephrase``
from its ``m_loc`` image — what the scene gate relies on.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the commands only write files: no window, whatever the default backend

from attrib.data import DataError
from editing.run import EditOptions, default_steps, run_edit
from editing.vead import SCENE_SIMILARITIES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editing", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("edit", help="train and evaluate VisEdit (VEAD + IM) on one backbone")
    p.add_argument("--backbone", default="llava", help="llava | blip2 | minigpt4")
    p.add_argument("--model", type=Path, default=None, help="local HF folder (default: the shipped model)")
    p.add_argument("--data", default="vqa", choices=["vqa", "caption"], help="E-VQA or E-IC")
    p.add_argument("--train", type=Path, default=None, help="MMEdit training JSON (default: the world's)")
    p.add_argument("--eval", type=Path, default=None, help="MMEdit evaluation JSON (default: the world's)")
    p.add_argument("--images", type=Path, default=None, help="image root (default: each file's folder)")
    p.add_argument("--attribution", type=Path, default=None, help="attribution.json (or its folder) to place from")
    p.add_argument("--checkpoint", type=Path, default=None, help="trained adapter: evaluate without training")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps of --batch-size edits (default: {default_steps('llava')} for llava, "
                        f"{default_steps('blip2')} otherwise)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<backbone>)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in OUT/checkpoint")
    p.add_argument("--skip-bad", action="store_true", help="skip records with a missing image or field")
    p.add_argument("--batch-size", type=int, default=4, help="edits per training step")
    p.add_argument("--lr", type=float, default=None, help="adapter LR (default: 1e-4 for 7B-wide LMs, 1e-3 below)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mid-dim", type=int, default=None, help="VEAD / IM width (default: sized from the LM)")
    p.add_argument("--heads", type=int, default=None, help="VEAD attention heads")
    p.add_argument("--scene-gate", action=argparse.BooleanOptionalAction, default=EditOptions.scene_gate,
                   help="gate each input's edit by its scene match to the edit image (our extension; "
                        "--no-scene-gate: the paper's adapter)")
    p.add_argument("--scene-similarity", choices=SCENE_SIMILARITIES, default=EditOptions.scene_similarity,
                   help="what the scene gate compares: salient (states minus the training images' mean per "
                        "position, weighted by distance from it) or chamfer (the raw states)")
    p.add_argument("--target-role", action=argparse.BooleanOptionalAction, default=EditOptions.target_role,
                   help="mark the edit sample's target tokens for VEAD's keys and values (our extension; "
                        "--no-target-role: the paper's adapter)")
    p.add_argument("--n-eval", type=int, default=None, help="evaluate the first N records only")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--no-progress", action="store_true")
    q = commands.add_parser("scenes", help="how well scene similarity separates image_rephrase from m_loc images")
    q.add_argument("--backbone", default="llava", help="llava | blip2 | minigpt4")
    q.add_argument("--model", type=Path, default=None, help="local HF folder (default: the shipped model)")
    q.add_argument("--eval", type=Path, default=None, help="MMEdit file (default: the world's vqa_eval.json)")
    q.add_argument("--images", type=Path, default=None, help="image root (default: the file's folder)")
    q.add_argument("--n", type=int, default=None, help="first N records only")
    q.add_argument("--edit-layer", type=int, default=-1, help="where to read the visual states (-1 = LM input)")
    q.add_argument("--out", type=Path, default=None, help="write the JSON summary here too")
    q.add_argument("--no-progress", action="store_true")
    return parser


def _scenes(args) -> int:
    from attrib.data import load_records
    from attrib.defaults.recipe import load_model
    from editing.run import WORLD
    from editing.scenes import scene_separation

    backbone = load_model(args.backbone, args.model)
    records = load_records(args.eval or WORLD / "vqa_eval.json", args.images, n=args.n)
    summary = scene_separation(backbone, records, args.edit_layer, progress=not args.no_progress).to_json()
    text = json.dumps(summary, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _error(error: Exception) -> int:
    """Print ``error`` as one line ("error: ...", whatever the exception carried); the exit status."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    if args.no_progress:  # transformers' own weight-loading bar too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.command == "scenes":
        try:
            return _scenes(args)
        except (DataError, OSError, ValueError) as error:
            return _error(error)
    options = EditOptions(
        backbone=args.backbone, model=args.model, data=args.data, train=args.train, eval=args.eval,
        images=args.images, attribution=args.attribution, checkpoint=args.checkpoint, steps=args.steps,
        out=args.out, resume=args.resume, skip_bad=args.skip_bad, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, mid_dim=args.mid_dim, heads=args.heads, scene_gate=args.scene_gate,
        scene_similarity=args.scene_similarity, target_role=args.target_role, n_eval=args.n_eval,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    try:
        results = run_edit(options)
    except (DataError, OSError, ValueError) as error:
        return _error(error)
    v = results["methods"]["visedit"]
    skipped = results["n_skipped"]
    note = f"; skipped {skipped['train']} train / {skipped['eval']} eval records" if sum(skipped.values()) else ""
    print(f"{results['backbone']} on {results['dataset']}: {results['n_eval']} edits, Rel {v['rel']} "
          f"T-Gen {v['t_gen']} M-Gen {v['m_gen']} T-Loc {v['t_loc']} M-Loc {v['m_loc']}{note}; results in "
          f"{options.out or Path('runs') / options.backbone}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
