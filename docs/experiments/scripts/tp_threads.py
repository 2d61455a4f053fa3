"""Time Transformer-Patcher edits applied one after another on a default backbone, with a given thread count.

    HF_HUB_OFFLINE=1 THREADS=1 .venv/bin/python docs/experiments/scripts/tp_threads.py blip2 40

Prints the mean time of an edit and the mean optimiser steps. Run it once with THREADS=2, once with
THREADS=1, then twice at once with THREADS=1, to see what a second thread and a second process give.
Needs the worlds of `make runs/world/vqa_eval.json` and of a lifelong comparison (runs/world-2-n3000)."""
import os
import sys
import time
from pathlib import Path

import torch

from attrib.data import load_records
from attrib.defaults import load_model
from editing.editor import EditRequest
from editing.methods import MethodContext, build_method, method_config

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
name, n = sys.argv[1], int(sys.argv[2])
backbone = load_model(name)
train = load_records(Path("runs/world/vqa_train.json"))
records = load_records(Path("runs/world-2-n3000/vqa_eval.json"))[:n]
editor = build_method("tp", MethodContext(backbone, hyper=method_config("tp", name)))
editor.prepare(train, [])
start, steps = time.perf_counter(), []
for record in records:
    steps.append(editor.edit(EditRequest.from_record(record, "vqa"))["steps"])
seconds = time.perf_counter() - start
print(f"threads {torch.get_num_threads()}: {1000 * seconds / n:.1f} ms an edit, {sum(steps) / n:.2f} steps")
