"""MEND on the tiny backbones: the gradient factors, the untrained network as gradient descent, edits,
exact restore, training and its checkpoint."""
from __future__ import annotations

import pytest
import torch

from attrib.data import load_records
from editing.editor import EditRequest
from editing.evaluation.metrics import predict_rows
from editing.methods import MethodContext, build_method, method_config
from editing.methods.common import target_loss
from editing.methods.mend_net import edit_factors, frozen, low_rank_update
from tests.editing.methods.forward import logits

PROMPT = "what color is the circle? The answer is:"
SMALL = {"n_edit_layers": 2, "rank": 16, "steps": 40, "batch_size": 2, "lr": 1e-3, "lr_lr": 1e-3, "eval_every": 20,
         "n_dev": 2, "max_seconds": 3600.0}  # a step cap, not a time cap, even on a busy machine


@pytest.fixture
def make_mend():
    """``make_mend(backbone, work=None, **hyper)``: a MEND editor with small sizes; restored at teardown."""
    made = []

    def make(backbone, work=None, **hyper):
        config = {**method_config("mend", backbone.spec.name), **SMALL, **hyper}
        editor = build_method("mend", MethodContext(backbone, hyper=config, work=work))
        made.append(editor)
        return editor

    yield make
    for editor in made:
        editor.restore()


def _weight_gradients(backbone, modules, image, prompt, target):
    weights = [m.weight for m in modules]
    flags = [w.requires_grad for w in weights]
    for weight in weights:
        weight.requires_grad_(True)
    try:
        return torch.autograd.grad(target_loss(backbone, [image], [prompt], [target]), weights)
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_the_rank_one_terms_sum_to_the_weight_gradient(tiny_backbone, tiny_images, make_mend):
    editor = make_mend(tiny_backbone)
    with frozen(tiny_backbone.model):
        factors = edit_factors(tiny_backbone, editor.modules, [tiny_images[0]], [PROMPT], ["red"])
    expected = _weight_gradients(tiny_backbone, editor.modules, tiny_images[0], PROMPT, "red")
    for layer, grad in zip(factors, expected, strict=True):
        assert layer.inputs.shape[:2] == layer.grads.shape[:2] == layer.mask.shape
        assert not layer.mask[0, -1]  # the last position feeds no loss: no rank-1 term
        torch.testing.assert_close(layer.gradient(), grad, rtol=1e-4, atol=1e-7)


def test_each_row_of_a_batch_gets_the_factors_of_its_own_edit(tiny_backbone, tiny_images, make_mend):
    editor = make_mend(tiny_backbone)
    shape = "what shape is it?"
    with frozen(tiny_backbone.model):
        both = edit_factors(tiny_backbone, editor.modules, tiny_images, [PROMPT, shape], ["red", "square"])
        alone = edit_factors(tiny_backbone, editor.modules, [tiny_images[1]], [shape], ["square"])
    for pair, single in zip(both, alone, strict=True):
        row = pair.grads[1][pair.mask[1]]
        torch.testing.assert_close(row, single.grads[0][single.mask[0]], rtol=1e-4, atol=1e-7)


def test_an_untrained_mend_edits_by_one_gradient_step_of_size_alpha(tiny_backbone, tiny_images, make_mend):
    editor = make_mend(tiny_backbone, edit_lr=0.5)
    before = [m.weight.detach().clone() for m in editor.modules]
    grads = _weight_gradients(tiny_backbone, editor.modules, tiny_images[0], PROMPT, "blue")
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    for module, old, grad in zip(editor.modules, before, grads, strict=True):
        torch.testing.assert_close(module.weight.detach() - old, -0.5 * grad, rtol=1e-4, atol=1e-7)


def test_an_edit_makes_the_target_the_teacher_forced_answer(tiny_backbone, tiny_images, make_mend):
    editor = make_mend(tiny_backbone, edit_lr=50.0)  # untrained: one large gradient step
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    row = predict_rows(tiny_backbone, [tiny_images[0]], [PROMPT], ["blue"])[0]
    assert torch.equal(row.answer_argmax, row.labels)


def test_restore_is_bit_exact_on_image_and_text_inputs(tiny_backbone, tiny_images, make_mend):
    editor = make_mend(tiny_backbone, edit_lr=50.0)
    image_before, text_before = logits(tiny_backbone, [tiny_images[1]], PROMPT), logits(tiny_backbone, None, PROMPT)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    assert not torch.equal(logits(tiny_backbone, [tiny_images[1]], PROMPT), image_before)
    assert not torch.equal(logits(tiny_backbone, None, PROMPT), text_before)  # text_edits: the LM's weights change
    editor.restore()
    assert torch.equal(logits(tiny_backbone, [tiny_images[1]], PROMPT), image_before)
    assert torch.equal(logits(tiny_backbone, None, PROMPT), text_before)


def test_an_edit_changes_only_the_edited_projections(tiny_backbone, tiny_images, make_mend):
    editor = make_mend(tiny_backbone, edit_lr=1.0)
    flags = {name: (p.requires_grad, p.grad is None) for name, p in tiny_backbone.model.named_parameters()}
    before = {name: p.detach().clone() for name, p in tiny_backbone.model.named_parameters()}
    hooks = _hook_count(tiny_backbone.model)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    edited = {id(m.weight) for m in editor.modules}
    last = tiny_backbone.n_layers - 1
    assert editor.modules[-1] is tiny_backbone.module(f"{tiny_backbone.spec.layers}.{last}.{editor.hyper['weight']}")
    for name, parameter in tiny_backbone.model.named_parameters():
        assert torch.equal(parameter, before[name]) != (id(parameter) in edited), name
        assert (parameter.requires_grad, parameter.grad is None) == flags[name], name
    assert _hook_count(tiny_backbone.model) == hooks


def test_the_functional_update_equals_adding_delta_w(tiny_backbone, tiny_images, make_mend):
    editor = make_mend(tiny_backbone, edit_lr=1.0)
    with frozen(tiny_backbone.model):
        factors = edit_factors(tiny_backbone, editor.modules, [tiny_images[0]], [PROMPT], ["blue"])
    with torch.no_grad():
        transformed = editor.net.transform(factors)
        with low_rank_update(editor.modules, transformed, editor.net.edit_lrs, torch.arange(1)):
            functional = logits(tiny_backbone, [tiny_images[1]], PROMPT)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    torch.testing.assert_close(logits(tiny_backbone, [tiny_images[1]], PROMPT), functional, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tiny_backbone, tiny_world, tmp_path_factory):
    """(editor, report, training loss before, train records, dev records, work folder) of a MEND trained on
    the tiny world's two train records, per backbone."""
    train, dev = load_records(tiny_world / "vqa_train.json"), load_records(tiny_world / "vqa_eval.json")
    work = tmp_path_factory.mktemp(f"mend-{tiny_backbone.spec.name}")
    editor = build_method("mend", MethodContext(tiny_backbone, hyper={**method_config("mend", tiny_backbone.spec.name),
                                                                      **SMALL}, work=work))
    with torch.no_grad():
        start = editor.objective(train)["total"].item()
    report = editor.prepare(train, dev)
    yield editor, report, start, train, dev, work
    editor.restore()


def test_prepare_lowers_the_training_loss_and_reports(trained):
    editor, report, start, train, _, work = trained
    with torch.no_grad():
        assert editor.objective(train)["total"].item() < start
    assert report["steps"] == SMALL["steps"] and "shortened" in report and report["seconds"] > 0
    assert [point["step"] for point in report["dev_curve"]] == [0, 20, 40]
    assert {"rel", "t_gen", "m_gen", "t_loc", "m_loc"} <= set(report["dev_curve"][0])
    assert report["loss_curve"][-1]["step"] == SMALL["steps"]
    assert (work / "mend.safetensors").is_file()


def test_a_trained_mend_makes_multi_token_edits(trained, tiny_backbone):
    editor, _, _, train, _, _ = trained
    for record in train:
        request = EditRequest.from_record(record)
        editor.edit(request)
        row = predict_rows(tiny_backbone, [request.image], [request.prompt], [request.target])[0]
        editor.restore()
        assert len(row.labels) > 1 and torch.equal(row.answer_argmax, row.labels), record.alt


def test_prepare_loads_a_network_trained_with_the_same_config(trained, tiny_backbone, make_mend):
    editor, report, _, train, dev, work = trained
    again = make_mend(tiny_backbone, work=work)
    loaded = again.prepare(train, dev)
    assert loaded["loaded"] == str(work / "mend.safetensors") and loaded["steps"] == report["steps"]
    for (name, mine), theirs in zip(editor.net.state_dict().items(), again.net.state_dict().values()):
        assert torch.equal(mine, theirs), name
    other = make_mend(tiny_backbone, work=work, steps=2)  # another config: trained afresh
    assert "loaded" not in other.prepare(train, dev)


def test_the_fit_runs_on_one_thread_and_gives_the_caller_its_threads_back(tiny_backbone, tiny_world, make_mend,
                                                                          monkeypatch):
    train, dev = load_records(tiny_world / "vqa_train.json"), load_records(tiny_world / "vqa_eval.json")
    editor = make_mend(tiny_backbone, steps=2, eval_every=10)
    seen = []
    fit = type(editor)._train
    monkeypatch.setattr(type(editor), "_train", lambda self, *a: seen.append(torch.get_num_threads()) or fit(self, *a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = editor.prepare(train, dev)
        assert seen == [1] and report["fit_threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_damaged_network_cache_is_named_and_nothing_is_loaded(tiny_dirs, make_mend, tmp_path):
    from safetensors.torch import load_file, save_file

    from attrib.backbones.loader import load_backbone
    from attrib.errors import ArtifactError

    editor = make_mend(load_backbone("llava", tiny_dirs["llava"]), work=tmp_path)
    path, key = tmp_path / "mend.safetensors", editor._run_key([])
    editor._save(path, key, {"steps": 1})
    raw, tensors = path.read_bytes(), load_file(path)
    meta = {"key": key, "report": "{}"}
    name = next(k for k, v in sorted(tensors.items()) if v.dim() == 2)
    before = {k: v.clone() for k, v in editor.net.state_dict().items()}
    cases = [(lambda: path.write_bytes(raw[:-9]), "not a readable MEND network cache"),
             (lambda: save_file({**tensors, name: tensors[name][..., :1].clone()}, path, metadata=meta),
              f"tensor '{name}' has shape .*; delete it to train again"),
             (lambda: save_file({**tensors, "extra": torch.zeros(1)}, path, metadata=meta), "unexpected 'extra'"),
             (lambda: save_file(tensors, path, metadata={"key": key, "report": "{"}), "metadata 'report' is not JSON"),
             (lambda: save_file(tensors, path, metadata={"key": key}), "metadata 'report': missing; expected JSON"),
             (lambda: save_file(tensors, path, metadata={"key": key, "report": "[]"}), "'report' is not a JSON object")]
    for damage, message in cases:
        damage()
        with pytest.raises(ArtifactError, match=message):
            editor._load(path, key)
        assert all(torch.equal(v, before[k]) for k, v in editor.net.state_dict().items())
    save_file({"extra": torch.zeros(1)}, path, metadata={"key": "another run"})
    assert editor._load(path, key) is None  # trained otherwise: trained again, not refused
    path.write_bytes(raw)
    assert editor._load(path, key) == {"steps": 1}


def test_two_processes_train_the_network_of_one(tiny_dirs, tmp_path):
    """MEND's training as two CPU processes (``accelerate launch``, 2 of the 4 edits of each global batch
    each) against one: the running statistics fold in the whole batch and the summed gradients are the
    global batch's, so the network after 3 steps is the same (the per-record gradient factors are batched
    differently, so they agree to float rounding, not bit for bit)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from attrib.world import write_world
    from tests.launch import launch, run_alone

    world = write_world(tmp_path / "world", seed=0, n_train=8, n_eval=2, n_caption_train=1, n_caption_eval=1)
    script = str(Path(__file__).with_name("ddp_mend_run.py"))
    args = ["llava", str(tiny_dirs["llava"]), str(world / "vqa_train.json")]
    run_alone(script, *args, str(tmp_path / "one.safetensors"), "3")
    launch(script, *args, str(tmp_path / "two.safetensors"), "3")
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys() and one["count"] == two["count"]
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-6 if key in ("mean", "m2") else 0, atol=1e-5,
                                   msg=key)
