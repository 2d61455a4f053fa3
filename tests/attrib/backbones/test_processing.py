"""Visual-token location and the refusal of inputs that would silently drop the image."""
from __future__ import annotations

import pytest
import torch

from attrib.backbones.spec import IMAGE_PLACEHOLDER


def expected_positions(backbone, prompt: str) -> list[int]:
    """Where the image tokens must be in an unpadded row, from the template's text before them."""
    tok = backbone.tokenizer
    n = backbone.n_visual_tokens
    if backbone.spec.placeholder_expansion == "processor" and IMAGE_PLACEHOLDER not in backbone.prompt_template:
        return list(range(n))  # BLIP-2: the processor puts the queries in front of BOS
    before = backbone.format_prompt(prompt).split(IMAGE_PLACEHOLDER)[0]
    start = len(tok(before).input_ids)
    return list(range(start, start + n))


def test_locator_finds_expected_positions(tiny_backbone, tiny_images):
    prompt = "what color is the circle?"
    inputs = tiny_backbone.encode(tiny_images[:1], [prompt])
    positions = tiny_backbone.visual_positions(inputs["input_ids"])
    assert positions.shape == (1, tiny_backbone.n_visual_tokens)
    assert positions[0].tolist() == expected_positions(tiny_backbone, prompt)


def test_locator_with_left_padding(tiny_backbone, tiny_images):
    inputs = tiny_backbone.encode(tiny_images, ["red", "what color is the large circle on the left?"])
    positions = tiny_backbone.visual_positions(inputs["input_ids"])
    ids = inputs["input_ids"]
    for row in range(2):
        assert (ids[row, positions[row]] == tiny_backbone.image_token_id).all()
    assert (inputs["attention_mask"][:, -1] == 1).all()  # last prompt token at -1 in every row


def test_text_only_inputs_run_without_image(tiny_backbone):
    inputs = tiny_backbone.encode(None, ["nq question: what is the capital of zorbia", "red"])
    assert not (inputs["input_ids"] == tiny_backbone.image_token_id).any()
    with torch.no_grad():
        logits = tiny_backbone.forward(inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("keep", [0, 1])
def test_missing_placeholders_refused(tiny_dirs, tiny_images, keep):
    from attrib.backbones.loader import load_backbone

    for name in ("blip2", "minigpt4"):
        backbone = load_backbone(name, tiny_dirs[name])
        inputs = backbone.encode(tiny_images[:1], ["what color is the circle?"])
        ids = inputs["input_ids"].clone()
        image_at = (ids == backbone.image_token_id).nonzero()[:, 1]
        ids[0, image_at[keep:]] = backbone.tokenizer.pad_token_id  # too few (1) or none (0)
        inputs["input_ids"] = ids
        with pytest.raises(ValueError, match=f"row 0 has {keep} image placeholder tokens"):
            backbone.forward(inputs)


def test_template_processor_needs_placeholder(tiny_dirs, tiny_images):
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("minigpt4", tiny_dirs["minigpt4"])
    with pytest.raises(ValueError, match="0 '<image>' placeholders in the text for 1 images"):
        backbone.processor(images=tiny_images[:1], text=["no image here"])


def test_forward_matches_model(tiny_backbone, tiny_images):
    inputs = tiny_backbone.encode(tiny_images, ["red", "what shape?"])
    with torch.no_grad():
        assert torch.equal(tiny_backbone.forward(inputs).logits, tiny_backbone.model(**inputs).logits)
