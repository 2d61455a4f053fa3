"""Transformer-Patcher on the tiny backbones: the edit lands, restore is exact, only the patch learns, memory
inputs keep their outputs, and the training shortcut equals the hooked model."""
from __future__ import annotations

import pytest
import torch

from attrib.data import load_records
from attrib.prompts import load_prompts
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch
from editing.methods import MethodContext, build_method, method_config
from editing.methods.patcher import PatcherConfig, ffn_modules
from tests.editing.methods.forward import logits

FAST = {"steps": 300, "lr": 0.05, "memory_records": 8, "memory_batch": 2, "memory_tail": 4, "memory_other": 2}
PROMPT = "what color is the circle?"


@pytest.fixture
def make_patcher():
    """``make_patcher(backbone, **hyper)``: a `tp` editor; every one is restored at teardown."""
    made = []

    def make(backbone, **overrides):
        hyper = {**method_config("tp", backbone.spec.name), **FAST, **overrides}
        editor = build_method("tp", MethodContext(backbone, task="vqa", seed=0, hyper=hyper))
        made.append(editor)
        return editor

    yield make
    for editor in made:
        editor.restore()


def _answer_argmax(backbone, image, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = teacher_forced_batch(backbone, [image], [prompt], [target])
    with torch.no_grad():
        logits = backbone.forward(batch.inputs, use_cache=False).logits
    return batch.answer_logits(logits, 0).argmax(-1), batch.labels(0)


@pytest.mark.parametrize(("neurons", "target"), [("edit", "blue"), ("token", "blue square")])
def test_edit_makes_the_target_the_prediction(tiny_backbone, tiny_images, make_patcher, neurons, target):
    predicted, labels = _answer_argmax(tiny_backbone, tiny_images[0], PROMPT, target)
    assert not torch.equal(predicted, labels)
    editor = make_patcher(tiny_backbone, neurons=neurons)
    report = editor.edit(EditRequest(tiny_images[0], PROMPT, target))
    predicted, labels = _answer_argmax(tiny_backbone, tiny_images[0], PROMPT, target)
    assert report["fixed"] and torch.equal(predicted, labels)
    assert report["neurons"] == (1 if neurons == "edit" else len(labels))


def test_restore_is_bit_exact_on_image_and_text_inputs(tiny_backbone, tiny_images, make_patcher):
    input_module, output_module = ffn_modules(tiny_backbone, tiny_backbone.n_layers - 1)
    hooks = (len(input_module._forward_pre_hooks), len(output_module._forward_hooks))
    image_before = logits(tiny_backbone, tiny_images[:1], [PROMPT])
    text_before = logits(tiny_backbone, None, [PROMPT])
    editor = make_patcher(tiny_backbone)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    assert not torch.equal(logits(tiny_backbone, tiny_images[:1], [PROMPT]), image_before)
    editor.restore()
    assert torch.equal(logits(tiny_backbone, tiny_images[:1], [PROMPT]), image_before)
    assert torch.equal(logits(tiny_backbone, None, [PROMPT]), text_before)
    assert (len(input_module._forward_pre_hooks), len(output_module._forward_hooks)) == hooks
    editor.restore()  # a second restore is a no-op


def test_only_the_patch_learns(tiny_backbone, tiny_images, make_patcher):
    weights = {name: p.detach().clone() for name, p in tiny_backbone.model.named_parameters()}
    for parameter in tiny_backbone.model.parameters():
        parameter.grad = None  # the session's backbones are shared: other tests' gradient runs may leave some
    editor = make_patcher(tiny_backbone)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    for name, parameter in tiny_backbone.model.named_parameters():
        assert torch.equal(parameter, weights[name]), name
        assert parameter.grad is None, name
    neurons = editor.hook.neurons
    assert neurons.keys.shape == (1, tiny_backbone.config.text_config.hidden_size)
    assert not any(p.requires_grad for p in neurons.parameters())


def test_patch_acts_on_text_only_inputs(tiny_backbone, tiny_images, make_patcher):
    assert make_patcher(tiny_backbone).text_edits
    before = logits(tiny_backbone, None, [PROMPT])
    editor = make_patcher(tiny_backbone)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    with torch.no_grad():
        editor.hook.neurons.bias.fill_(1e4)  # fire everywhere: the text LM's FFN carries the patch too
    assert not torch.allclose(logits(tiny_backbone, None, [PROMPT]), before)


def test_training_shortcut_equals_the_hooked_model(tiny_backbone, tiny_images, make_patcher):
    editor = make_patcher(tiny_backbone, neurons="token")
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue square"))
    neurons = editor.hook.neurons
    batch = teacher_forced_batch(tiny_backbone, tiny_images[:1], [PROMPT], ["blue square"])
    with torch.no_grad():
        hooked = tiny_backbone.forward(batch.inputs, use_cache=False).logits[0]
    editor.restore()
    q, h = editor.trace(batch.inputs, with_output=True)
    with torch.no_grad():
        _, shortcut = editor.patched_logits(neurons, q[0], h[0])
    assert torch.allclose(shortcut, hooked.float(), atol=1e-4)


def test_prepare_builds_the_memory(tiny_backbone, tiny_world, make_patcher):
    train = load_records(tiny_world / "vqa_train.json")
    editor = make_patcher(tiny_backbone)
    report = editor.prepare(train, [])
    per_prompt = FAST["memory_tail"] + FAST["memory_other"]
    assert report["memory_records"] == len(train) and report["seconds"] >= 0
    assert 0 < report["memory_size"] <= 2 * len(train) * per_prompt  # fields src and loc
    assert editor.memory.shape == (report["memory_size"], tiny_backbone.config.text_config.hidden_size)


def test_memory_inputs_keep_their_logits(tiny_backbone, tiny_world, make_patcher):
    train = load_records(tiny_world / "vqa_train.json")
    record = load_records(tiny_world / "vqa_eval.json")[0]
    editor = make_patcher(tiny_backbone)
    editor.prepare(train, [])
    images = [r.load_image("image") for r in train]
    prompts = [load_prompts()["vqa"].format(src=r.src) for r in train]
    before = [logits(tiny_backbone, [image], [prompt])[0, -1] for image, prompt in zip(images, prompts)]
    report = editor.edit(EditRequest.from_record(record))
    assert report["silent"] and "memory" in report
    z = editor.hook.neurons.pre_activation(editor.memory)
    assert (z <= 0).all()  # the neuron stays silent on every stored memory state
    for image, prompt, reference in zip(images, prompts, before):
        assert torch.allclose(logits(tiny_backbone, [image], [prompt])[0, -1], reference, atol=1e-4)


def test_config_is_checked():
    hyper = method_config("tp", "llava")
    assert PatcherConfig.from_hyper(hyper).memory_fields == ("src", "loc")
    assert PatcherConfig.from_hyper({**hyper, "lr": "1e-2"}).lr == 0.01
    with pytest.raises(ValueError, match="unknown"):
        PatcherConfig.from_hyper({**hyper, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="neurons"):
        PatcherConfig.from_hyper({**hyper, "neurons": "layer"})
    with pytest.raises(ValueError, match="memory_fields"):
        PatcherConfig.from_hyper({**hyper, "memory_fields": ["src", "rephrase"]})
