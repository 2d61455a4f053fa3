"""The lifelong comparison behind ``visedit compare --edits 1,10,100,1000`` / ``make compare EDITS=...``.

Every method whose edits accumulate (``Editor.lifelong``) runs the chunked protocol of
`editing.evaluation.sequential` once per N on the same test edits, with the pre-edit outputs of each N
computed by the first method and read by the others (`editing.evaluation.pre_edit_cache`, in
``OUT/pre-edit``); methods that hold one edit at a time are listed as skipped. The data roles are the
single-edit comparison's, except the test split (`distinct_scenes`): max(N) eval records of the world of
``test_seed``, drawn in file order from a pool of ``POOL`` × max(N) (``runs/world-<seed>-n<pool>``) so
that no two of them show the same scene and no M-Loc image shows an edit's scene. Learned methods reuse
the single-edit comparison's fits (`CompareOptions.fitted`): same train and dev roles.
`editing.command.compare` builds each method and hands it to `run_sequential`.

Why scenes and not image files: in the world an image *is* its scene — the image rephrase that M-Gen asks
an edit to reach re-places and resizes the same objects (`attrib.world.variants.question_variant`). Two
records whose images are different files but hold the same multiset of (shape, colour) objects are two
renderings of one image. Taking the first 1,000 eval records of seed 2 as they come, 38.0 % of the edits
share their scene with another of the 1,000, and 35.5 % of the M-Loc images show the scene of one of the
1,000 edits: an editor that generalises to image rephrases must then change those M-Loc answers, which
caps M-Loc near 65 before any method runs. Drawing distinct scenes keeps every 1,000 edits apart; it
needs about 2,050 records of seed 2 and leaves few one-object scenes (there are only 30 of them), so the
split is reported with its object counts (`image_sharing`).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

import numpy as np

from attrib.data import DataError, EditRecord
from attrib.world.rebuild import WorldRebuild
from editing.command.report import METRICS

POOL = 3  # the lifelong test world holds POOL × max(N) eval records to draw distinct scenes from


def _scenes(records: Sequence[EditRecord]) -> list[tuple[tuple, tuple]] | None:
    """(edit scene, M-Loc scene) keys of every record, or None when any is not an unchanged world record."""
    rebuild = WorldRebuild()
    worlds = [rebuild.world_record(record) for record in records]
    if any(world is None for world in worlds):
        return None
    return [(w.scenes["image"].object_key(), w.scenes["m_loc"].object_key()) for w in worlds]


def distinct_scenes(records: Sequence[EditRecord], n: int) -> list[EditRecord]:
    """The first ``n`` of ``records`` (world eval records, in file order) such that no two chosen edits
    show the same scene, no chosen M-Loc image shows a chosen edit's scene, and no edit's M-Loc image is its
    own scene (module docstring). Raises DataError when the records are not a world's or too few qualify."""
    keys = _scenes(records)
    if keys is None:
        source = records[0].source if records else "the test file"
        raise DataError(f"{source}: distinct test scenes need the world's records (scenes rebuilt from its "
                        f"meta.json); these are not an unchanged world split")
    chosen, edits, m_locs = [], set(), set()
    for record, (edit, m_loc) in zip(records, keys):
        if edit in edits or edit in m_locs or m_loc in edits or edit == m_loc:
            continue
        chosen.append(record)
        edits.add(edit)
        m_locs.add(m_loc)
        if len(chosen) == n:
            return chosen
    raise DataError(f"{records[0].source}: only {len(chosen)} of its {len(records)} records have distinct "
                    f"scenes, {n} were asked for; write the test world with more eval records")


def image_sharing(records: Sequence[EditRecord]) -> dict:
    """How many of ``records``' edit images are distinct (by file content) and how many edits share their
    image with another edit; for world records also by scene (`Scene.object_key`), with how many M-Loc images
    show one of the edits' scenes and the edits' object counts."""
    digests = [hashlib.sha256(record.image_path("image").read_bytes()).hexdigest() for record in records]
    counts = Counter(digests)
    shared = {"edits": len(records), "distinct_images": len(counts),
              "edits_sharing_an_image": sum(n for n in counts.values() if n > 1),
              "most_edits_on_one_image": max(counts.values(), default=0)}
    keys = _scenes(records)
    if keys is not None:
        scenes = Counter(edit for edit, _ in keys)
        shared.update(distinct_scenes=len(scenes), edits_sharing_a_scene=sum(n for n in scenes.values() if n > 1),
                      m_loc_on_an_edit_scene=sum(m_loc in scenes for _, m_loc in keys),
                      objects_per_edit={str(k): v for k, v in sorted(Counter(len(e) for e, _ in keys).items())})
    return shared


def run_sequential(options, prepared) -> dict:
    """Run the protocol for every N of ``options.edits`` with one method built and prepared by
    `compare.prepared_method` (``prepared``: its editor, context, roles, prepare report and seconds);
    returns its ``methods/<name>.json`` without the peak memory (``sequential`` → N → scores)."""
    import torch

    from editing.evaluation.latency import PROTOCOL as LATENCY_PROTOCOL
    from editing.evaluation.pre_edit_cache import shared_pre_edit
    from editing.evaluation.sequential import evaluate_sequential

    editor, context, roles, report, prepare_s = prepared
    result = {"lifelong": editor.lifelong, "t_loc_by_construction": not editor.text_edits,
              "latency_protocol": LATENCY_PROTOCOL,
              "prepare_s": round(prepare_s, 2), "hyper": context.hyper, "seed": options.seed, "prepare": report,
              "threads": torch.get_num_threads()}
    if editor.lifelong:
        per_n = {}
        for n in sorted(options.edits):  # each N has its pre-edit rows in its own blocks, shared by the methods
            pre, how = shared_pre_edit(editor, roles.test, n, options.output() / "pre-edit", progress=options.progress)
            scores = evaluate_sequential(editor, roles.test, n, options.task, pre=pre, progress=options.progress)
            scores["pre_edit"] = how
            scores["mean"] = round(float(np.mean([scores[k] for k in METRICS])), 2)
            per_n[str(n)] = scores
        result["sequential"] = per_n
    edits = editor.edit_report()  # over every edit of the run, all N together
    if edits:
        result["edits"] = edits
    editor.close()
    return result


def remeasure_latency(options, prepared, result: dict) -> dict:
    """``result`` (a method's lifelong results file) with the latency of every N measured again
    (`editing.evaluation.sequential.measure_latency`, the protocol of today) and its scores kept: for results
    whose latency an earlier, noisier protocol measured (those without ``latency_protocol``)."""
    from editing.evaluation.latency import PROTOCOL as LATENCY_PROTOCOL
    from editing.evaluation.sequential import measure_latency

    editor, roles = prepared[0], prepared[2]
    try:
        for n in result["sequential"]:
            result["sequential"][n].update(measure_latency(editor, roles.test, int(n), options.task))
    finally:
        editor.close()
    return {**result, "latency_protocol": LATENCY_PROTOCOL}
