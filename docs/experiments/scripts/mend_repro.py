"""Fit MEND twice in this process with one seed and print a hash of each fitted network.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/experiments/scripts/mend_repro.py 300   # steps per fit

Needs the world of `make runs/world/vqa_eval.json`; set THREADS=1 to fit single-threaded."""
import hashlib
import os
import sys
from pathlib import Path

import torch

from attrib.data import load_records
from attrib.defaults import load_model
from editing.methods import MethodContext, build_method, method_config

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
bb = load_model("blip2")
train = load_records(Path("runs/world/vqa_train.json"))
dev = load_records(Path("runs/world/vqa_eval.json"))[:8]
hyper = {**method_config("mend", "blip2"), "steps": int(sys.argv[1])}
for run in range(2):
    ed = build_method("mend", MethodContext(bb, hyper=hyper, seed=0))
    report = ed.prepare(train, dev)
    h = hashlib.sha256()
    for p in ed.net.state_dict().values():
        h.update(p.detach().cpu().numpy().tobytes())
    last = report["loss_curve"][-1]["total"] if report["loss_curve"] else None
    print("fit", run, "steps", report["steps"], "hash", h.hexdigest()[:16], "last loss", last, flush=True)
