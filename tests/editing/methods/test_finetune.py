"""FT-L and FT-V on the tiny backbones: the edit is learnt, only the chosen weights move, restore is exact,
FT-V cannot touch a text-only input, and the configs load."""
from __future__ import annotations

import pytest
import torch

from attrib.answers import teacher_forced_hits
from attrib.data import load_records
from attrib.defaults import default_model, load_model
from editing.editor import EditRequest
from editing.methods import METHODS, MethodContext, build_method, method_config
from editing.methods.common import target_loss
from editing.methods.finetune import FinetuneConfig, bridge_parameters, build, mlp_output_projection
from tests.editing.methods.forward import logits

PROMPT = "what color is the circle? The answer is:"
TEXT_PROMPT = "nq question: what is the capital of zorbia?"
STRONG = {"steps": 40, "lr": 2e-2, "weight_decay": 0.0}  # a large step for the random tiny models
QUICK = {**STRONG, "steps": 4}  # enough to move the weights


@pytest.fixture
def make_ft():
    """``make_ft(backbone, name, **hyper)``: an FT editor (config file + ``hyper``); restored at teardown."""
    made = []

    def make(backbone, name, **hyper):
        config = {**method_config(name, backbone.spec.name), **hyper}
        editor = build_method(name, MethodContext(backbone, hyper=config))
        made.append(editor)
        return editor

    yield make
    for editor in made:
        editor.restore()


def _changed(backbone, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in backbone.model.named_parameters() if not torch.equal(p, before[name])}


def _state(backbone) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in backbone.model.named_parameters()}


def test_both_names_are_registered_and_their_configs_load(tiny_backbone):
    for name in ("ft_l", "ft_v"):
        assert METHODS[name] == "finetune"
        config = FinetuneConfig.from_hyper(method_config(name, tiny_backbone.spec.name))
        assert config.steps > 0 and config.lr > 0 and config.norm_constraint == 0.0


@pytest.mark.parametrize("target", ["blue", "plimton"])  # one token, and a novel several-token word
def test_after_an_ft_l_edit_every_target_token_is_predicted(tiny_backbone, tiny_images, make_ft, target):
    editor = make_ft(tiny_backbone, "ft_l", **STRONG)
    assert not all(teacher_forced_hits(tiny_backbone, [tiny_images[0]], [PROMPT], [target])[0])
    losses = editor.edit(EditRequest(tiny_images[0], PROMPT, target))
    assert len(losses) == STRONG["steps"] and losses[-1] < losses[0]
    assert all(teacher_forced_hits(editor.backbone, [tiny_images[0]], [PROMPT], [target])[0])


def test_an_ft_v_edit_lowers_the_target_loss(tiny_backbone, tiny_images, make_ft):
    """The random tiny LMs barely read their visual tokens (the loss can fall by ~0.1 nat whatever the
    rate), so the hit itself is checked on the trained shipped models below."""
    editor = make_ft(tiny_backbone, "ft_v", **{**STRONG, "steps": 10})
    losses = editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    after = target_loss(editor.backbone, [tiny_images[0]], [PROMPT], ["blue"]).item()
    assert after < losses[0] - 1e-3


@pytest.mark.parametrize("backbone", ["blip2", "llava", "minigpt4"])
@pytest.mark.parametrize("name", ["ft_l", "ft_v"])
def test_on_the_shipped_models_the_configured_edit_is_learnt(tiny_world, backbone, name):
    """With the config file's hyperparameters, both single-token edits of the tiny world are predicted."""
    if not (default_model(backbone) / "config.json").is_file():
        pytest.skip(f"the default {backbone} model is not built")
    model = load_model(backbone)
    editor = build_method(name, MethodContext(model))
    try:
        for record in load_records(tiny_world / "vqa_eval.json", n=2):
            request = EditRequest.from_record(record)
            assert not all(teacher_forced_hits(model, [request.image], [request.prompt], [request.target])[0])
            editor.edit(request)
            assert all(teacher_forced_hits(model, [request.image], [request.prompt], [request.target])[0])
            editor.restore()
    finally:
        editor.restore()


@pytest.mark.parametrize("name", ["ft_l", "ft_v"])
def test_restore_gives_bit_identical_logits_on_image_and_text_inputs(tiny_backbone, tiny_images, make_ft, name):
    before_image = logits(tiny_backbone, [tiny_images[1]], PROMPT)
    before_text = logits(tiny_backbone, None, TEXT_PROMPT)
    flags = [p.requires_grad for p in tiny_backbone.model.parameters()]
    editor = make_ft(tiny_backbone, name, **QUICK)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    editor.edit(EditRequest(tiny_images[1], PROMPT, "yes"))  # edits stack until restore
    assert not torch.equal(logits(editor.backbone, [tiny_images[1]], PROMPT), before_image)
    editor.restore()
    assert torch.equal(logits(editor.backbone, [tiny_images[1]], PROMPT), before_image)
    assert torch.equal(logits(editor.backbone, None, TEXT_PROMPT), before_text)
    assert [p.requires_grad for p in tiny_backbone.model.parameters()] == flags


def test_ft_l_changes_only_the_last_layers_mlp_output_projection(tiny_backbone, tiny_images, make_ft):
    editor = make_ft(tiny_backbone, "ft_l", **QUICK)
    projection = mlp_output_projection(tiny_backbone, -1)
    last = tiny_backbone.spec.layer_path(tiny_backbone.n_layers - 1, "mlp")
    names = {name for name, p in tiny_backbone.model.named_parameters() if p is projection.weight}
    assert len(names) == 1 and next(iter(names)).startswith(last)
    assert projection.out_features == tiny_backbone.config.text_config.hidden_size
    before = _state(tiny_backbone)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    assert _changed(tiny_backbone, before) == names
    assert editor.text_edits


def test_ft_l_layer_is_a_config_key(tiny_backbone, tiny_images, make_ft):
    editor = make_ft(tiny_backbone, "ft_l", layer=0, **QUICK)
    assert editor.parameters == [mlp_output_projection(tiny_backbone, 0).weight]
    before = _state(tiny_backbone)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    (name,) = _changed(tiny_backbone, before)
    assert name.startswith(tiny_backbone.spec.layer_path(0, "mlp"))


def test_ft_v_changes_only_the_bridge_and_never_a_text_only_input(tiny_backbone, tiny_images, make_ft):
    editor = make_ft(tiny_backbone, "ft_v", **QUICK)
    assert not editor.text_edits
    *before_modules, projection = tiny_backbone.spec.bridge
    tuned = {id(p) for p in bridge_parameters(tiny_backbone, 1)}
    assert {id(p) for p in tiny_backbone.module(projection).parameters()} <= tuned
    before = _state(tiny_backbone)
    text_before = logits(tiny_backbone, None, TEXT_PROMPT)
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    changed = _changed(tiny_backbone, before)
    assert any(name.startswith(projection) for name in changed)
    assert all(name.startswith(tiny_backbone.spec.bridge) for name in changed)
    assert {id(p) for n, p in tiny_backbone.model.named_parameters() if n in changed} <= tuned
    assert torch.equal(logits(editor.backbone, None, TEXT_PROMPT), text_before)


def test_ft_v_tunes_the_last_qformer_layers_it_is_told(tiny_backbone):
    *before_modules, projection = tiny_backbone.spec.bridge
    alone = len(list(tiny_backbone.module(projection).parameters()))
    if not before_modules:  # LLaVA: the projector is the whole bridge
        assert len(bridge_parameters(tiny_backbone, 1)) == alone
        return
    assert len(bridge_parameters(tiny_backbone, 0)) == alone
    layers = tiny_backbone.module(before_modules[0]).encoder.layer
    last = {id(p) for p in layers[-1].parameters()}
    assert last <= {id(p) for p in bridge_parameters(tiny_backbone, 1)}
    everything = {id(p) for layer in layers for p in layer.parameters()}
    assert everything <= {id(p) for p in bridge_parameters(tiny_backbone, len(layers) + 3)}


def test_the_norm_constraint_bounds_every_weight_change(tiny_backbone, tiny_images, make_ft):
    editor = make_ft(tiny_backbone, "ft_l", **{**QUICK, "norm_constraint": 1e-3})
    weight = editor.parameters[0]
    before = weight.detach().clone()
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    change = (weight.detach() - before).abs().max().item()
    assert 0 < change <= 1e-3 + 1e-7


def test_the_learning_rate_moves_with_the_lm_width(tiny_backbone):
    width = tiny_backbone.config.text_config.hidden_size
    assert FinetuneConfig(steps=1, lr=1e-4).learning_rate(tiny_backbone) == 1e-4
    scaled = FinetuneConfig(steps=1, lr=1e-4, reference_width=4 * width).learning_rate(tiny_backbone)
    assert scaled == pytest.approx(4e-4)


def test_unknown_names_and_keys_are_refused(tiny_backbone):
    with pytest.raises(ValueError, match="ft_l and ft_v"):
        build(MethodContext(tiny_backbone, name="ft_x", hyper={"steps": 1, "lr": 1.0}))
    with pytest.raises(ValueError, match="unknown key"):
        FinetuneConfig.from_hyper({"steps": 1, "lr": 1.0, "num_steps": 3})


@pytest.mark.parametrize("name, hyper", [("ft_l", {}), ("ft_l", {"layer": 0}), ("ft_v", {})])
def test_running_the_frozen_prefix_once_gives_the_whole_model_steps(tiny_backbone, tiny_images, make_ft, name,
                                                                    hyper):
    """``reuse_prefix`` (the layers below FT-L's layer, or FT-V's vision tower, run once per edit) against
    every step running the whole model: the same losses and weights over two stacked edits."""
    requests = [EditRequest(tiny_images[0], PROMPT, "blue"), EditRequest(tiny_images[1], PROMPT, "plimton")]
    runs, original = [], None
    for reuse in (False, True):
        editor = make_ft(tiny_backbone, name, **QUICK, **hyper, reuse_prefix=reuse)
        original = original or [p.detach().clone() for p in editor.parameters]
        losses = [editor.edit(request) for request in requests]
        runs.append((losses, [p.detach().clone() for p in editor.parameters]))
        editor.restore()
    (whole_losses, whole_weights), (reused_losses, reused_weights) = runs
    assert torch.allclose(torch.tensor(reused_losses), torch.tensor(whole_losses), atol=1e-5, rtol=0)
    for whole, reused in zip(whole_weights, reused_weights, strict=True):
        assert torch.allclose(reused, whole, atol=1e-5, rtol=0)
    assert any(not torch.equal(whole, before) for whole, before in zip(whole_weights, original))


def test_ft_l_text_only_edit_with_the_prefix_reused(tiny_backbone, make_ft):
    """A text-only edit request takes the text LM's path through the split forward and is learnt."""
    editor = make_ft(tiny_backbone, "ft_l", **STRONG)
    losses = editor.edit(EditRequest(None, TEXT_PROMPT, "blue"))
    assert losses[-1] < losses[0] - 1e-3
