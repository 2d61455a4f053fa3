"""Every lifelong method: three edits on three images accumulate, and one restore() undoes all of them
bit for bit (the sequential protocol's contract, `editing.editor.Editor.lifelong`)."""
from __future__ import annotations

import pytest
import torch

from attrib.answers import teacher_forced_hits
from attrib.data import load_records
from editing.editor import EditRequest
from editing.methods import METHODS, MethodContext, build_method, method_config
from editing.methods.finetune import bridge_parameters, mlp_output_projection
from editing.methods.ike import NEW_FACT
from editing.methods.serac_parts import Rows
from tests.editing.methods.forward import logits

PROMPTS = ["what color is the circle? The answer is:", "what shape is the blue object? The answer is:",
           "is there a green triangle? The answer is:"]
TARGETS = ["blue", "red", "yes"]  # one token each on the tiny tokenizer
TEXT_PROMPT = "nq question: what is the capital of zorbia?"
FAST = {"ft_l": {"steps": 4, "lr": 2e-2, "weight_decay": 0.0}, "ft_v": {"steps": 4, "lr": 2e-2, "weight_decay": 0.0},
        "mend": {"n_edit_layers": 2, "rank": 16}, "tp": {"steps": 60, "lr": 0.05}, "grace": {"steps": 15}}
LIFELONG = ["none", "ft_l", "ft_v", "tp", "ike", "mend", "serac", "grace", "lookup"]


def test_the_list_covers_every_lifelong_method(tiny_backbone):
    flagged = set()
    for name in METHODS:
        if name.startswith("visedit"):
            continue  # built from a placement (`MethodContext.extra`); tested with the adapter
        hyper = {**method_config(name, tiny_backbone.spec.name), **FAST.get(name, {})}
        editor = build_method(name, MethodContext(tiny_backbone, hyper=hyper))
        if editor.lifelong:
            flagged.add(name)
        editor.close()
    assert flagged == set(LIFELONG)


@pytest.fixture(scope="module")
def records(tiny_world):
    return load_records(tiny_world / "vqa_eval.json")


@pytest.fixture
def make():
    """``make(name, backbone, records)``: a method with fast hyperparameters (lookup prepared on
    ``records``); closed at teardown, as the tiny backbones are shared."""
    made = []

    def build(name, backbone, records):
        hyper = {**method_config(name, backbone.spec.name), **FAST.get(name, {})}
        editor = build_method(name, MethodContext(backbone, task="vqa", seed=0, hyper=hyper))
        made.append(editor)
        if name == "lookup":
            editor.prepare(records, records)
        return editor

    yield build
    for editor in made:
        editor.close()


def _requests(records) -> list[EditRequest]:
    return [EditRequest(r.load_image("image"), p, t) for r, p, t in zip(records, PROMPTS, TARGETS, strict=True)]


def _weights(editor, name) -> list[torch.Tensor]:
    backbone = editor.backbone
    if name == "ft_l":
        return [mlp_output_projection(backbone, editor.config.layer).weight.detach().clone()]
    if name == "ft_v":
        return [p.detach().clone() for p in bridge_parameters(backbone, editor.config.qformer_layers)]
    return [m.weight.detach().clone() for m in editor.modules]  # mend


@pytest.mark.parametrize("name", LIFELONG)
def test_three_edits_accumulate_and_one_restore_undoes_them(name, tiny_backbone, records, make):
    requests = _requests(records)
    rows = [([r.image], [r.prompt]) for r in requests] + [(None, [TEXT_PROMPT])]
    before = [logits(tiny_backbone, *row) for row in rows]
    editor = make(name, tiny_backbone, records)
    assert editor.lifelong
    editor.edit(requests[0])
    first = _weights(editor, name) if name in ("ft_l", "ft_v", "mend") else None
    first_hit = all(teacher_forced_hits(editor.backbone, [requests[0].image], [requests[0].prompt],
                                        [requests[0].target])[0])
    for request in requests[1:]:
        editor.edit(request)
    _first_edit_is_live(name, editor, requests, first, first_hit)
    editor.restore()
    for row, reference in zip(rows, before):
        assert torch.equal(logits(editor.backbone, *row), reference)


def _first_edit_is_live(name, editor, requests, first, first_hit) -> None:
    """The method-specific evidence that the first edit survived the next two."""
    request = requests[0]
    if name in ("lookup", "grace"):  # deterministic: the first image routes to the first edit's value
        assert first_hit
        assert all(teacher_forced_hits(editor.backbone, [request.image], [request.prompt], [request.target])[0])
    elif name in ("ft_l", "ft_v", "mend"):
        now = _weights(editor, name)
        assert not all(torch.equal(a, b) for a, b in zip(now, first))  # later edits moved the weights on ...
        editor.restore()  # ... from the first edit's, not from the original: a lone third edit lands elsewhere
        editor.edit(requests[2])
        assert not all(torch.equal(a, b) for a, b in zip(now, _weights(editor, name)))
        editor.restore()  # the three edits again, for the restore check
        for each in requests:
            editor.edit(each)
    elif name == "tp":
        installed = editor.hook.neurons
        assert len(editor.patches) == 3 and len(installed.keys) == sum(len(p.keys) for p in editor.patches)
        assert torch.equal(installed.keys[:len(editor.patches[0].keys)], editor.patches[0].keys)
    elif name == "ike":
        context = editor.context_of(request.prompt)
        for each in requests:  # every live edit is in the pool the prompt retrieves from
            assert f"New Fact: {each.prompt} {each.target}\nPrompt: {each.prompt} {each.target}\n\n" in context
        assert editor.backbone.format_prompt(request.prompt).count("New Fact:") >= 4
        assert context.endswith(NEW_FACT.format(fact=editor._ranked(request.prompt)[0].request.prompt,
                                                target=editor._ranked(request.prompt)[0].request.target))
    elif name == "serac":  # the first edit's own input routes to the first memory entry
        assert len(editor.memory) == 3
        expected = editor.counterfactual_logits(Rows([request.image], [request.prompt], [request.target]), [0], [0])
        view = editor.backbone
        with torch.no_grad():
            got = view.forward(view.encode([request.image], [request.prompt], [request.target])).logits
        assert editor.last_scores[0] > editor.hyper["threshold"]  # the untrained head routes its own input
        width = min(got.shape[1], expected.shape[1])
        assert torch.equal(got[0, -width:], expected[0, -width:].to(got))


def test_lookup_routes_each_image_to_its_edit_and_the_latest_wins(tiny_backbone, records, make):
    requests = _requests(records)
    editor = make("lookup", tiny_backbone, records)
    for request in requests:
        editor.edit(request)
    view = editor.backbone
    images = [r.image for r in requests]
    assert editor.matches(view.encode(images, [PROMPTS[0]] * 3)).tolist() == [0, 1, 2]  # one batched table
    for request in requests:
        assert all(teacher_forced_hits(view, [request.image], [request.prompt], [request.target])[0])
    editor.edit(EditRequest(requests[0].image, PROMPTS[0], "square"))  # the same image again
    assert editor.matches(view.encode(images[:1], [PROMPTS[0]])).tolist() == [3]
    assert all(teacher_forced_hits(view, images[:1], [PROMPTS[0]], ["square"])[0])


def test_tp_installs_every_patch_in_one_pair_of_hooks(tiny_backbone, tiny_images, records, make):
    from editing.methods.patcher import ffn_modules
    input_module, output_module = ffn_modules(tiny_backbone, tiny_backbone.n_layers - 1)
    before = logits(tiny_backbone, tiny_images[:1], PROMPTS[0])
    hooks = (len(input_module._forward_pre_hooks), len(output_module._forward_hooks))
    editor = make("tp", tiny_backbone, records)
    reports = [editor.edit(request) for request in _requests(records)]
    assert (len(input_module._forward_pre_hooks), len(output_module._forward_hooks)) == (hooks[0] + 1, hooks[1] + 1)
    assert len(editor.patches) == 3 and len(editor.hook.neurons.keys) == sum(r["neurons"] for r in reports)
    editor.restore()
    assert editor.hook is None and editor.patches == []
    assert (len(input_module._forward_pre_hooks), len(output_module._forward_hooks)) == hooks
    assert torch.equal(logits(tiny_backbone, tiny_images[:1], PROMPTS[0]), before)
