"""Command line of the attribution engine.

    python -m attrib heatmaps [--backbone llava] [--model DIR] [--data FILE] [--images DIR] [--n N] [--out DIR]

With --model unset the shipped default of the backbone is used; with --data unset, the world's eval set.
Errors print one line ("error: ...") and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the commands only write files: no window, whatever the default backend

from attrib.data import DataError

DEFAULT_DATA = Path("runs/world/vqa_eval.json")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="llava", help="llava | blip2 | minigpt4 (default: llava)")
    parser.add_argument("--model", type=Path, default=None, help="local HF folder (default: the shipped model)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MMEdit JSON file")
    parser.add_argument("--images", type=Path, default=None, help="image root (default: the data file's folder)")
    parser.add_argument("--n", type=int, default=24, help="number of records")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: figures/<backbone>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every noise draw (recorded in the outputs)")


def _load(args):
    from attrib.data import load_records
    from attrib.defaults.recipe import load_model

    backbone = load_model(args.backbone, args.model)
    records = load_records(args.data, args.images, n=args.n)
    return backbone, records


def heatmaps(args) -> int:
    from attrib.attribution import AttributionConfig, run_attribution

    started = time.time()
    backbone, records = _load(args)
    out = args.out or Path("figures") / args.backbone
    attribution = run_attribution(backbone, records, AttributionConfig(seed=args.seed), dataset=str(args.data))
    attribution.save(out)
    figures = attribution.plot_all(out)
    placement = attribution.placement
    print(f"{args.backbone}: {len(records)} samples, edit layer {placement.edit_layer}, IT layers "
          f"{placement.it_layers[0]}–{placement.it_layers[-1]}; {len(figures)} figures and the artifact in {out} "
          f"({time.time() - started:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attrib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _common(commands.add_parser("heatmaps", help="contribution bars, region heatmaps, artifact, placement"))
    from attrib.validation import add_validate_command, validate_command

    add_validate_command(commands)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    try:
        return {"heatmaps": heatmaps, "validate": validate_command}[args.command](args)
    except (DataError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
