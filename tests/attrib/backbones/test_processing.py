"""Visual-token location, the refusal of inputs that would silently drop the image, and the reading of
template_processor.json (malformed settings end in a one-line ArtifactError)."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from attrib.backbones.loader import load_backbone
from attrib.backbones.processing import TEMPLATE_PROCESSOR_FILE, TemplateProcessor
from attrib.backbones.spec import IMAGE_PLACEHOLDER
from attrib.errors import ArtifactError


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


@pytest.fixture(scope="module")
def minigpt4_copy(tmp_path_factory, tiny_dirs):
    """A copy of the tiny MiniGPT-4 folder whose template_processor.json the tests rewrite."""
    folder = tmp_path_factory.mktemp("minigpt4-copy") / "m"
    shutil.copytree(tiny_dirs["minigpt4"], folder)
    return folder


def _settings_loads_or_names(folder, settings_bytes: bytes):
    """TemplateProcessor.from_pretrained on ``settings_bytes``: the processor, or the ArtifactError (one line,
    naming the file) it raised."""
    settings_file = folder / TEMPLATE_PROCESSOR_FILE
    original = settings_file.read_bytes()
    settings_file.write_bytes(settings_bytes)
    try:
        return TemplateProcessor.from_pretrained(folder)
    except ArtifactError as error:
        assert len(str(error).splitlines()) == 1 and str(settings_file) in str(error), str(error)
        return error
    finally:
        settings_file.write_bytes(original)


VALID = {"num_image_tokens": 4, "image_token": "<image>", "image_processor_class": "BlipImageProcessorPil"}


@pytest.mark.parametrize("settings,message", [
    (b"[]", "expected an object, found a list"),
    (b'{"num_image_tokens": 4, "image_token": "<im', "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8 text at byte 0"),
    (json.dumps({**VALID, "num_image_tokens": None}).encode(), r"field 'num_image_tokens': expected a whole number, "
                                                              "found null"),
    (json.dumps({**VALID, "num_image_tokens": True}).encode(), r"field 'num_image_tokens': .* found a boolean"),
    (json.dumps({**VALID, "num_image_tokens": 0}).encode(), r"field 'num_image_tokens': 0 is not a positive count"),
    (json.dumps({k: v for k, v in VALID.items() if k != "image_token"}).encode(), "missing field 'image_token'"),
    (json.dumps({**VALID, "image_token": ""}).encode(), r"field 'image_token': empty"),
    (json.dumps({**VALID, "image_token": "<nope>"}).encode(), r"field 'image_token': '<nope>' is not a token"),
    (json.dumps({**VALID, "image_processor_class": "AutoModel"}).encode(),
     r"field 'image_processor_class': 'AutoModel' is not an image processor class"),
    (json.dumps({**VALID, "image_processor_class": "__class__"}).encode(), "is not an image processor class"),
    (json.dumps({**VALID, "image_processor_class": ["BlipImageProcessorPil"]}).encode(), "expected a string"),
])
def test_malformed_template_processor_settings_are_named(minigpt4_copy, settings, message):
    error = _settings_loads_or_names(minigpt4_copy, settings)
    assert isinstance(error, ArtifactError) and re.search(message, str(error)), error


def test_the_loader_reports_bad_settings_in_one_line(minigpt4_copy):
    settings_file = minigpt4_copy / TEMPLATE_PROCESSOR_FILE
    original = settings_file.read_bytes()
    settings_file.write_text(json.dumps({**VALID, "num_image_tokens": "4"}))
    try:
        with pytest.raises(ArtifactError, match=r"template_processor.json, field 'num_image_tokens'"):
            load_backbone("minigpt4", minigpt4_copy)
    finally:
        settings_file.write_bytes(original)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


PLAUSIBLE = st.sampled_from(["<image>", "BlipImageProcessorPil", "CLIPImageProcessorPil", 4, 16, -1])


@given(key=st.sampled_from(sorted(VALID)), value=PLAUSIBLE | JSON)
def test_fuzz_template_processor_one_field_replaced(minigpt4_copy, key, value):
    result = _settings_loads_or_names(minigpt4_copy, json.dumps({**VALID, key: value}).encode())
    event(type(result).__name__)
    if isinstance(result, TemplateProcessor):
        assert result.num_image_tokens >= 1 and result.image_token_id != result.tokenizer.unk_token_id
