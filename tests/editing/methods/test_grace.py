"""GRACE on the tiny backbones: the codebook's radius rules, routing among several edits, inputs far from
every key left bit-exact, the edit landing, and the exact restore."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attrib.answers import teacher_forced_hits
from editing.editor import EditRequest
from editing.methods import METHODS, MethodContext, build_method, method_config
from editing.methods.grace import Grace, GraceConfig
from tests.editing.methods.forward import logits

PROMPT = "what color is the circle? The answer is:"
TEXT_PROMPT = "nq question: what is the capital of zorbia?"
FAST = {"steps": 15}


@pytest.fixture
def make_grace():
    """``make_grace(backbone, **hyper)``: a GRACE editor (config file + FAST + ``hyper``); closed at teardown."""
    made = []

    def make(backbone, **hyper) -> Grace:
        config = {**method_config("grace", backbone.spec.name), **FAST, **hyper}
        editor = build_method("grace", MethodContext(backbone, hyper=config))
        made.append(editor)
        return editor

    yield make
    for editor in made:
        editor.close()


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_registered_with_the_papers_defaults_and_dev_choices():
    assert list(METHODS).index("grace") == list(METHODS).index("lookup") - 1
    config = GraceConfig.from_hyper(method_config("grace", "llava"))
    assert (config.eps, config.lr, config.steps, config.replacement) == (1.0, 1.0, 20, "prompt")
    assert GraceConfig.from_hyper(method_config("grace", "blip2")).eps == 3.0
    assert [config.layer_index(n) for n in (2, 8, 12, 32)] == [0, 5, 8, 23]
    with pytest.raises(ValueError, match="replacement"):
        GraceConfig.from_hyper({"replacement": "all"})
    with pytest.raises(ValueError, match="unknown"):
        GraceConfig.from_hyper({"epsilon": 1.0})


def test_radius_rules_new_expand_split_and_ties(tiny_backbone, make_grace):
    editor = make_grace(tiny_backbone, eps=1.0)
    codebook = editor._install().codebook
    unit = torch.eye(editor.linear.in_features)
    assert editor._place(0 * unit[0], "blue") == (0, "new")
    assert editor._place(1.5 * unit[0], "blue") == (0, "expand")  # within eps + r, same target: r grows to d
    assert len(codebook) == 1 and codebook.radii[0].item() == pytest.approx(1.5)
    assert editor._place(-1.5 * unit[0], "red") == (1, "split")  # same distance, another target: halve both
    assert codebook.radii.tolist() == pytest.approx([0.75 - 1e-5, 0.75])
    assert editor._place(5 * unit[1], "yes") == (2, "new")  # farther than eps + r from every key
    assert codebook.radii[2].item() == 1.0
    distance, entry = codebook.nearest(torch.stack([0.1 * unit[0], -1.4 * unit[0], 4.5 * unit[1]]))
    assert entry.tolist() == [0, 1, 2] and bool((distance <= codebook.radii[entry]).all())
    assert editor._place(5 * unit[1], "no") == (3, "split")  # the same key, a new target: the latest wins
    assert codebook.nearest(5 * unit[1][None])[1].item() == 3 and codebook.radii[3].item() == 0.0


def test_an_edit_lands_and_restore_is_exact(tiny_backbone, tiny_images, make_grace):
    image_before = logits(tiny_backbone, tiny_images[:1], PROMPT)
    text_before = logits(tiny_backbone, None, TEXT_PROMPT)
    hooks = _hooks(tiny_backbone.model)  # after a forward: transformers adds its own on the first one
    editor = make_grace(tiny_backbone)
    assert editor.lifelong and editor.text_edits
    for parameter in tiny_backbone.model.parameters():
        parameter.grad = None  # the session's backbone may carry another test's gradients
    assert not all(teacher_forced_hits(tiny_backbone, tiny_images[:1], [PROMPT], ["blue"])[0])
    report = editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    assert report["action"] == "new" and report["entries"] == 1 and report["losses"][-1] < report["losses"][0]
    assert all(teacher_forced_hits(editor.backbone, tiny_images[:1], [PROMPT], ["blue"])[0])
    for parameter in tiny_backbone.model.parameters():
        assert parameter.grad is None  # only the value learns
    editor.restore()
    assert editor.adaptor is None and _hooks(tiny_backbone.model) == hooks
    assert torch.equal(logits(editor.backbone, tiny_images[:1], PROMPT), image_before)
    assert torch.equal(logits(editor.backbone, None, TEXT_PROMPT), text_before)


def test_routes_each_image_to_its_own_edit(tiny_backbone, tiny_images, make_grace):
    rng = np.random.default_rng(7)
    images = [*tiny_images, Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))]
    targets = ["blue", "red", "yes"]
    editor = make_grace(tiny_backbone)
    for image, target in zip(images, targets):
        editor.edit(EditRequest(image, PROMPT, target))
    keys = torch.stack([editor.key(image, PROMPT) for image in images])
    distance, entry = editor.adaptor.codebook.nearest(keys)
    assert entry.tolist() == [0, 1, 2] and bool((distance <= editor.adaptor.codebook.radii[entry]).all())
    assert editor.adaptor.codebook.targets == targets
    for image, target in zip(images, targets):
        assert all(teacher_forced_hits(editor.backbone, [image], [PROMPT], [target])[0]), target


def test_an_input_far_from_every_key_gets_the_unedited_logits(tiny_backbone, tiny_images, make_grace):
    far = [(tiny_images[1], "how many objects are there?"), (None, TEXT_PROMPT)]
    edited_before = logits(tiny_backbone, tiny_images[:1], PROMPT)
    before = [logits(tiny_backbone, None if image is None else [image], prompt) for image, prompt in far]
    editor = make_grace(tiny_backbone, eps=1e-4)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    codebook = editor.adaptor.codebook
    for (image, prompt), reference in zip(far, before):
        distance, entry = codebook.nearest(editor.key(image, prompt)[None])
        assert distance.item() > codebook.radii[entry].item()
        assert torch.equal(logits(editor.backbone, None if image is None else [image], prompt), reference)
    assert not torch.equal(logits(editor.backbone, tiny_images[:1], PROMPT), edited_before)  # the edit is live


def test_the_split_loss_equals_the_whole_models(tiny_backbone, tiny_images, make_grace):
    """The shortcut (layers below the wrapped one run once) against `common.target_loss` of the whole
    model, with an entry live and with a value being trained."""
    from editing.methods.common import target_loss

    editor = make_grace(tiny_backbone)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    for request in (EditRequest(tiny_images[0], PROMPT, "red"), EditRequest(tiny_images[1], PROMPT, "yes")):
        whole = target_loss(editor.backbone, [request.image], [request.prompt], [request.target])
        torch.testing.assert_close(editor.split_loss(request)(), whole, rtol=1e-5, atol=1e-5)
    leaf = editor.adaptor.codebook.values[0].clone().requires_grad_(True)
    editor.adaptor.trained = (0, leaf)
    request = EditRequest(tiny_images[0], PROMPT, "red")
    split = editor.split_loss(request)()
    whole = target_loss(editor.backbone, [request.image], [request.prompt], [request.target])
    grads = [torch.autograd.grad(loss, leaf)[0] for loss in (split, whole)]
    editor.adaptor.trained = None
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
