"""``visedit_gated`` with its scene router and question gate: prepare fits them, puts them in the edit bank /
hook, saves them under the work folder and reuses them while their key holds; the paper's ``visedit`` gets
neither, and captions no question gate."""
from __future__ import annotations

import pytest
import torch

from attrib.data import load_records
from attrib.world import write_world
from editing.adapter.visedit import EditPlacement
from editing.editor import EditRequest
from editing.methods import MethodContext, build_method, method_config

FAST = {"steps": 2, "batch_size": 2, "checkpoint_every": 1,
        "router_config": {"hidden": 16, "dim": 8, "epochs": 3, "batch_size": 8},
        "question_gate": {"hidden": 16, "dim": 8, "epochs": 2, "batch_size": 8}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("router") / "w", seed=0, n_train=12, n_eval=6, n_caption_train=1,
                       n_caption_eval=1)


def _method(name, backbone, work, task="vqa"):
    hyper = {**method_config(name, backbone.spec.name), **FAST}
    context = MethodContext(backbone, task=task, seed=0, work=work, hyper=hyper,
                            extra={"placement": EditPlacement(edit_layer=0)})
    return build_method(name, context)


def test_the_router_is_fitted_saved_and_reused(tiny_backbone, world, tmp_path):
    train, dev = load_records(world / "vqa_train.json"), load_records(world / "vqa_eval.json")
    editor = _method("visedit_gated", tiny_backbone, tmp_path)
    try:
        report = editor.prepare(train, dev)["router"]
        assert not report["loaded"] and report["dev_edits"] == 6 and report["stored_besides"] == 12
        assert editor.hook.bank.router is not None
        assert editor.hook.bank.router.threshold_for(10_000).item() == pytest.approx(report["threshold"], abs=1e-4)
        assert [row["bank_size"] for row in report["by_bank_size"]] == [1, 10, 18]
        assert (tmp_path / "router.safetensors").is_file()
    finally:
        editor.close()
    again = _method("visedit_gated", tiny_backbone, tmp_path)
    try:
        reloaded = again.prepare(train, dev)["router"]
        assert reloaded["loaded"] and reloaded["threshold"] == report["threshold"]
        fitted = again.hook.bank.router.state_dict()
        assert fitted["thresholds"].tolist() == pytest.approx([r["threshold"] for r in report["by_bank_size"]],
                                                             abs=1e-4)
    finally:
        again.close()
    other = _method("visedit_gated", tiny_backbone, tmp_path)
    try:  # fewer dev records: another key, fitted again
        assert not other.prepare(train, dev[:4])["router"]["loaded"]
    finally:
        other.close()


def test_the_question_gate_is_fitted_saved_reused_and_stored_per_edit(tiny_backbone, world, tmp_path):
    train, dev = load_records(world / "vqa_train.json"), load_records(world / "vqa_eval.json")
    editor = _method("visedit_gated", tiny_backbone, tmp_path)
    try:
        report = editor.prepare(train, dev)["question_gate"]
        assert not report["loaded"] and report["dev_edits"] == 6 and report["dev_same_image_questions"] > 0
        gate = editor.hook.question_gate
        assert gate is not None and float(gate.threshold) == pytest.approx(report["threshold"], abs=1e-4)
        assert (tmp_path / "question_gate.safetensors").is_file()
        request = EditRequest.from_record(dev[0], "vqa")
        editor.edit(request)
        key = editor.hook.bank.questions[0]
        assert key is not None and torch.equal(key, editor.question_key(request.prompt))
    finally:
        editor.close()
    again = _method("visedit_gated", tiny_backbone, tmp_path)
    try:
        reloaded = again.prepare(train, dev)["question_gate"]
        assert reloaded["loaded"] and reloaded["threshold"] == report["threshold"]
        for name, tensor in gate.state_dict().items():
            assert torch.equal(again.hook.question_gate.state_dict()[name], tensor), name
    finally:
        again.close()
    caption = _method("visedit_gated", tiny_backbone, tmp_path / "caption", task="caption")
    try:
        assert caption.question_config is None and caption.hook.question_gate is None
    finally:
        caption.close()


def test_the_router_needs_dev_records(tiny_backbone, world, tmp_path):
    editor = _method("visedit_gated", tiny_backbone, tmp_path)
    try:
        with pytest.raises(ValueError, match="visedit_gated: the scene router .* got 12 and 0"):
            editor.prepare(load_records(world / "vqa_train.json"), [])
    finally:
        editor.close()


def test_the_papers_visedit_has_no_router_and_no_question_gate(tiny_backbone, world, tmp_path):
    editor = _method("visedit", tiny_backbone, tmp_path)
    try:
        report = editor.prepare(load_records(world / "vqa_train.json"), [])
        assert "router" not in report and "question_gate" not in report
        assert editor.hook.bank.router is None and editor.hook.question_gate is None
    finally:
        editor.close()


def test_the_router_config_comes_from_the_backbones_section(tiny_backbone, tmp_path):
    """BLIP-2 and MiniGPT-4 train their routers 120 epochs at lr 3e-3 (chosen on their dev); LLaVA keeps the
    defaults; the context's seed is the router's."""
    hyper = method_config("visedit_gated", tiny_backbone.spec.name)
    context = MethodContext(tiny_backbone, task="vqa", seed=5, work=tmp_path, hyper=hyper,
                            extra={"placement": EditPlacement(edit_layer=0)})
    editor = build_method("visedit_gated", context)
    try:
        config = editor.router_config
        expected = (60, 1e-3) if tiny_backbone.spec.name == "llava" else (120, 3e-3)
        assert (config.epochs, config.lr, config.seed) == (*expected, 5)
        assert (config.hidden, config.dim, config.temperature) == (512, 128, 0.1)
    finally:
        editor.close()


def test_the_output_write_drops_its_key_check_where_the_question_gate_is_on(tiny_backbone, tmp_path):
    """On E-VQA the question gate decides which question a write answers and the config's
    ``output_write_with_question_gate`` replaces the write's tau, margin, lr and min_weight; on E-IC (no gate) the
    write keeps the backbone's own; an override that is not a mapping of write fields is refused."""
    def method(task, hyper):
        context = MethodContext(tiny_backbone, task=task, seed=0, work=tmp_path / task, hyper=hyper,
                                extra={"placement": EditPlacement(edit_layer=0)})
        return build_method("visedit_gated", context)

    hyper = method_config("visedit_gated", tiny_backbone.spec.name)
    # E-IC: the key check at margin 10, except on BLIP-2, whose caption dev dropped it (the config's comment)
    caption = (None, 40.0, 0.5, 0.5) if tiny_backbone.spec.name == "blip2" else (0.7, 10.0, 0.05, 0.5)
    assert tuple(hyper["output_write"][k] for k in ("tau", "margin", "lr", "min_weight")) == caption
    assert hyper["output_write_with_question_gate"] == {"tau": None, "margin": 40.0, "lr": 0.5, "min_weight": 0.0}
    for task, tau, margin, lr, weight in [("vqa", None, 40.0, 0.5, 0.0), ("caption", *caption)]:
        editor = method(task, hyper)
        try:
            write = editor.hook.write_config
            assert (write.tau, write.margin, write.lr, write.min_weight, write.steps) == \
                (tau, margin, lr, weight, hyper["output_write"]["steps"]), task
        finally:
            editor.close()
    for bad, message in [({"key": 1}, "unknown key"), (0.5, "must be a mapping")]:
        with pytest.raises(ValueError, match=message):
            method("vqa", {**hyper, "output_write_with_question_gate": bad}).close()
