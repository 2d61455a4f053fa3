"""Run by `test_compare.py` under ``accelerate launch``: `visedit compare --prepare-only` for MEND and SERAC
on a tiny backbone, with their configs shrunk to a few steps (the shipped configs train for minutes).

    python prepare_run.py MODEL_FOLDER WORLD_FOLDER OUT_FOLDER
"""
import sys
from pathlib import Path

import editing.methods as methods
from visedit.cli import main

SHRUNK = {"mend": {"steps": 2, "batch_size": 2, "rank": 8, "n_edit_layers": 2, "n_dev": 2, "eval_every": 1},
          "serac": {"feature_batch": 2, "cls_records": 4, "cls_steps": 2, "cls_batch": 4, "cf_steps": 2,
                    "cf_batch": 2, "dev_records": 2, "dev_every": 1}}


def shrunk_config(name: str, backbone: str, _original=methods.method_config) -> dict:
    return {**_original(name, backbone), **SHRUNK.get(name, {})}


if __name__ == "__main__":
    model, world, out = sys.argv[1:]
    methods.method_config = shrunk_config  # build_method reads it from the package at call time
    sys.exit(main(["compare", "--backbone", "blip2", "--model", model, "--methods", "mend,serac", "--train",
                   str(Path(world) / "vqa_train.json"), "--eval", str(Path(world) / "vqa_eval.json"),
                   "--dev-n", "3", "--out", out, "--prepare-only", "--no-progress"]))
