"""Every editing method on E-IC records (captions: multi-token targets, the caption prompt): prepared on
caption training records, it edits, is scored over every target token and restores bit-exactly — the
comparison's caption task, at the tiny size."""
from __future__ import annotations

import math

import pytest
import torch

from attrib.backbones import load_backbone
from attrib.data import load_records
from attrib.world import write_world
from editing.adapter.visedit import EditPlacement
from editing.command.report import METRICS
from editing.evaluation.evaluate import evaluate_edits
from editing.methods import METHODS, MethodContext, build_method, method_config
from tests.editing.methods.test_lifelong import FAST as LIFELONG_FAST
from tests.editing.methods.test_mend import SMALL as MEND_SMALL
from tests.editing.methods.test_serac import FAST as SERAC_FAST
from tests.editing.methods.test_visedit import FAST as VISEDIT_FAST

FAST = {**LIFELONG_FAST, "mend": {**MEND_SMALL, "steps": 4}, "serac": {**SERAC_FAST, "cls_steps": 4, "cf_steps": 4},
        "visedit": VISEDIT_FAST, "visedit_gated": VISEDIT_FAST}


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    world = write_world(tmp_path_factory.mktemp("captions") / "w", seed=0, n_train=2, n_eval=1,
                        n_caption_train=8, n_caption_eval=2)
    return load_records(world / "caption_train.json"), load_records(world / "caption_eval.json")


@pytest.fixture(scope="module")
def blip2(tiny_dirs):
    return load_backbone("blip2", tiny_dirs["blip2"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_edits_captions_and_restores(name, blip2, captions, tmp_path):
    train, test = captions
    assert all(len(r.alt.split()) > 1 for r in test)  # E-IC keeps multi-token targets
    hyper = {**method_config(name, "blip2"), **FAST.get(name, {})}
    extra = {"placement": EditPlacement(edit_layer=0)} if name.startswith("visedit") else {}
    editor = build_method(name, MethodContext(blip2, task="caption", seed=0, work=tmp_path, hyper=hyper,
                                              extra=extra))
    before = {k: v.clone() for k, v in blip2.model.state_dict().items()}
    try:
        editor.prepare(train[:6], train[6:])
        scores = evaluate_edits(editor, test, "caption").to_json()
    finally:
        editor.close()
    assert scores["n_eval"] == len(test)
    assert all(math.isfinite(scores[k]) and 0 <= scores[k] <= 100 for k in METRICS)
    if name == "none":
        assert scores["m_loc"] == 100.0 and scores["t_loc"] == 100.0
    after = blip2.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
