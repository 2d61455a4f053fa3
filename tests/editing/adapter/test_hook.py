"""The adapter hook: only visual positions change; bypassed (bit-identical) without an edit, without an
image, and on single-token decoding steps."""
from __future__ import annotations

import copy

import pytest
import torch

from editing.editor import EditRequest

PROMPTS = ["what color is the circle?", "how many objects are there?"]


def _edit(editor, tiny_images):
    editor.edit(EditRequest(tiny_images[0], "what color is the circle?", "blue"))


def _capture_site(backbone, layer: int, store: list):
    """Hook registered after the adapter's, so it sees the (re)written states at the adapter's site."""
    if layer == -1:
        module = backbone.module(backbone.spec.layer_path(0))
        return module.register_forward_pre_hook(lambda m, args: store.append(args[0].clone()))
    module = backbone.module(backbone.spec.layer_path(layer))
    return module.register_forward_hook(lambda m, args, out: store.append(out.clone()))


@pytest.mark.parametrize("layer", [-1, 1])
def test_only_visual_positions_are_rewritten(tiny_backbone, tiny_images, make_editor, layer):
    editor = make_editor(tiny_backbone, layer)
    inputs = tiny_backbone.encode(tiny_images, PROMPTS)
    visual = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    visual.scatter_(1, tiny_backbone.visual_positions(inputs["input_ids"]), True)
    seen: list = []
    handle = _capture_site(tiny_backbone, layer, seen)
    try:
        with torch.no_grad():
            tiny_backbone.forward(inputs)
            _edit(editor, tiny_images)
            tiny_backbone.forward(inputs)
    finally:
        handle.remove()
    before, after = seen[0], seen[-1]  # the middle one is the edit sample's own forward
    assert torch.equal(before[~visual], after[~visual])  # text positions: bit-identical
    changed = (before != after).any(-1)
    assert changed[visual].all()  # every visual token moved


@pytest.mark.parametrize("layer", [-1, 1])
def test_bypass_without_edit_and_without_image(tiny_backbone, tiny_images, make_editor, layer):
    image_inputs = tiny_backbone.encode(tiny_images, PROMPTS)
    text_inputs = tiny_backbone.encode(None, PROMPTS)
    with torch.no_grad():
        plain_image = tiny_backbone.forward(image_inputs).logits
        plain_text = tiny_backbone.forward(text_inputs).logits
        editor = make_editor(tiny_backbone, layer)
        assert torch.equal(tiny_backbone.forward(image_inputs).logits, plain_image)  # installed, no edit
        _edit(editor, tiny_images)
        assert not torch.equal(tiny_backbone.forward(image_inputs).logits, plain_image)  # the edit acts
        assert torch.equal(tiny_backbone.forward(text_inputs).logits, plain_text)  # text-only: bypassed
        editor.restore()
        assert torch.equal(tiny_backbone.forward(image_inputs).logits, plain_image)


def test_single_token_step_is_bypassed(tiny_backbone, tiny_images, make_editor):
    editor = make_editor(tiny_backbone, 0)
    _edit(editor, tiny_images)
    hidden = torch.randn(2, 1, tiny_backbone.config.text_config.hidden_size)
    positions = torch.zeros(2, tiny_backbone.n_visual_tokens, dtype=torch.long)
    assert editor.hook.apply(hidden, positions) is hidden


def test_cached_decoding_step_is_bit_identical(tiny_dirs, tiny_images, make_editor):
    """LLaVA runs every decoding step through the root model: the cached one-token step must not be edited."""
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("llava", tiny_dirs["llava"])
    model = backbone.model
    editor = make_editor(backbone, 0)
    _edit(editor, tiny_images)
    inputs = backbone.encode(tiny_images[:1], PROMPTS[:1])
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
        step = dict(input_ids=torch.tensor([[5]]),
                    attention_mask=torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1))
        edited = model(**step, cache=copy.deepcopy(cache)).logits
        editor.restore()
        plain = model(**step, cache=copy.deepcopy(cache)).logits
    assert torch.equal(edited, plain)


def test_explicit_positions_reach_calls_that_skip_the_root(tiny_backbone, tiny_images, make_editor):
    """Calling the LM directly (what BLIP-2's generate does) sees no positions unless given a context."""
    editor = make_editor(tiny_backbone, 0)
    _edit(editor, tiny_images)
    inputs = tiny_backbone.encode(tiny_images[:1], PROMPTS[:1])
    embeds = tiny_backbone.module(tiny_backbone.spec.embed_tokens)(inputs["input_ids"])
    lm = tiny_backbone.module(tiny_backbone.spec.layers.rsplit(".layers", 1)[0])
    with torch.no_grad():
        plain = lm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
        with editor.hook.visual_positions(tiny_backbone.visual_positions(inputs["input_ids"])):
            edited = lm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
    assert not torch.equal(plain, edited)
    assert editor.hook.current_positions() is None  # the context is gone again


def test_generate_applies_the_edit_on_every_backbone(tiny_backbone, tiny_images, make_editor):
    editor = make_editor(tiny_backbone, 0)
    _edit(editor, tiny_images)
    editor.hook.last_gate_logits = None
    answers = editor.generate(tiny_images[:1], PROMPTS[:1], max_new_tokens=2)
    assert len(answers) == 1
    assert editor.hook.last_gate_logits.shape == (1, tiny_backbone.n_visual_tokens)


def test_wrong_placeholder_count_is_refused_while_edited(tiny_backbone, tiny_images, make_editor):
    _edit(make_editor(tiny_backbone, 0), tiny_images)
    inputs = tiny_backbone.encode(tiny_images[:1], PROMPTS[:1])
    ids = inputs["input_ids"].clone()
    ids[0, tiny_backbone.visual_positions(ids)[0, 0]] = tiny_backbone.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="image placeholder tokens"):
        tiny_backbone.model(**dict(inputs, input_ids=ids))
