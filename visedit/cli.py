"""``visedit``: one command line for the whole toolkit.

    visedit world --seed 1 --out runs/world         # the synthetic world's MMEdit files
    visedit heatmaps --backbone llava                # attribution: bars, heatmaps, artifact, placement
    visedit validate --backbone llava --n 96         # region maps against the world's truth boxes
    visedit edit --backbone blip2                    # train and evaluate VisEdit (VEAD + IM)
    visedit compare --backbone blip2 --test-seed 2   # every editing method, reported on a fresh test split
    visedit caption-tokens --backbone blip2          # E-IC: which caption tokens each editor misses
    visedit scenes --backbone blip2                  # what the scene gate can tell apart, untrained
    visedit bench                                    # speed ratios against their goals
    visedit smoke-full --backbone llava              # the real sizes on random weights, on a CPU
    visedit bench-gpu                                # the real sizes' costs on one GPU, against their goals
    visedit train-defaults                           # retrain the three default models
    visedit convert-minigpt4 ...                     # the original MiniGPT-4 files → an HF folder

Each subcommand's ``--help`` lists its options with their defaults. Outputs go under ``runs/`` unless
``--out`` says otherwise. Errors print one line ("error: ...") and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable, NamedTuple

from attrib import commands as attribution
from attrib.data import DataError
from attrib.parallel import finish
from benchmarks import bench, gpu, smoke_full
from editing.command import cli as editing


class Command(NamedTuple):
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "world": Command("write the synthetic world's MMEdit files, images and truth.json",
                     attribution.world_arguments, attribution.world),
    "heatmaps": Command("attribution: contribution bars, region heatmaps, overlays, artifact, placement",
                        attribution.heatmaps_arguments, attribution.heatmaps),
    "validate": Command("score region maps and baselines against the world's truth boxes",
                        attribution.validate_arguments, attribution.validate),
    "edit": Command("train and evaluate VisEdit (VEAD + IM) on one backbone", editing.edit_arguments, editing.edit),
    "compare": Command("every editing method on one backbone: train on train, choose on dev, report on test",
                       editing.compare_arguments, editing.compare),
    "caption-tokens": Command("which target-caption tokens each editor misses on E-IC: the edited word or the rest",
                              editing.caption_tokens_arguments, editing.caption_tokens),
    "scenes": Command("how well scene similarity separates image_rephrase from m_loc images, untrained",
                      editing.scenes_arguments, editing.scenes),
    "bench": Command("speed ratios measured in one run, against their goals", bench.bench_arguments, bench.bench),
    "smoke-full": Command("the toolkit at the real backbone sizes on random bf16 weights (needs ~16 GB of RAM)",
                          smoke_full.smoke_arguments, smoke_full.smoke),
    "bench-gpu": Command("attribution, training and edited-forward costs at the real sizes on one GPU, "
                         "against their goals", gpu.bench_gpu_arguments, gpu.bench_gpu),
    "train-defaults": Command("train (resumably) and measure the default models",
                              attribution.train_defaults_arguments, attribution.train_defaults),
    "convert-minigpt4": Command("convert the original MiniGPT-4 weights into a Hugging Face folder",
                                attribution.convert_minigpt4_arguments, attribution.convert_minigpt4),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" where a default is a value; options whose default means something else
    (None, off) say so in their own help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    """The ``visedit`` argument parser with every subcommand."""
    top = argparse.ArgumentParser(prog="visedit", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="Run `visedit COMMAND --help` for a command's options.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help, formatter_class=_HelpFormatter)
        command.arguments(sub)
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        sub.set_defaults(run=command.run)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # the commands only write files: no window, whatever the default backend
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    if args.no_progress:  # transformers' own weight-loading bar too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.run(args)
    except (DataError, OSError, ValueError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    finally:
        finish()


if __name__ == "__main__":
    raise SystemExit(main())
