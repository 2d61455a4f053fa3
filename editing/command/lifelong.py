"""The lifelong comparison behind ``visedit compare --edits 1,10,100,1000`` / ``make compare EDITS=...``.

Every method whose edits accumulate (``Editor.lifelong``) runs the chunked protocol of
`editing.evaluation.sequential` once per N on the same test edits, with the pre-edit outputs computed
once; methods that hold one edit at a time are listed as skipped. The data roles are the single-edit
comparison's, except the test split: the first max(N) eval records of the world of ``test_seed`` written
with that many (``runs/world-<seed>-n<count>``), so N edits can live at once on distinct images. Learned
methods reuse the single-edit comparison's fits (`CompareOptions.fitted`): same train and dev roles.
`editing.command.compare` builds each method and hands it to `run_sequential`.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

import numpy as np

from attrib.data import EditRecord
from editing.command.report import METRICS


def image_sharing(records: Sequence[EditRecord]) -> dict:
    """How many of ``records``' edit images are distinct (by file content), and how many edits share their
    image with another edit."""
    digests = [hashlib.sha256(record.image_path("image").read_bytes()).hexdigest() for record in records]
    counts = Counter(digests)
    return {"edits": len(records), "distinct_images": len(counts),
            "edits_sharing_an_image": sum(n for n in counts.values() if n > 1),
            "most_edits_on_one_image": max(counts.values(), default=0)}


def run_sequential(options, prepared) -> dict:
    """Run the protocol for every N of ``options.edits`` with one method built and prepared by
    `compare.prepared_method` (``prepared``: its editor, context, roles, prepare report and seconds);
    returns its ``methods/<name>.json`` without the peak memory (``sequential`` → N → scores)."""
    import torch

    from editing.evaluation.sequential import evaluate_sequential, pre_edit_locality

    editor, context, roles, report, prepare_s = prepared
    result = {"lifelong": editor.lifelong, "t_loc_by_construction": not editor.text_edits,
              "prepare_s": round(prepare_s, 2), "hyper": context.hyper, "seed": options.seed, "prepare": report,
              "threads": torch.get_num_threads()}
    if editor.lifelong:
        pre = pre_edit_locality(editor, roles.test, options.task, progress=options.progress)
        per_n = {}
        for n in sorted(options.edits):
            scores = evaluate_sequential(editor, roles.test, n, options.task, pre=pre, progress=options.progress)
            scores["mean"] = round(float(np.mean([scores[k] for k in METRICS])), 2)
            per_n[str(n)] = scores
        result["sequential"] = per_n
    editor.close()
    return result
