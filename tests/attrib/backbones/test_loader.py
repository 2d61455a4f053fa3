"""load_backbone: the real loading path, its errors (malformed config.json and manifest.json fuzzed too), and
the Backbone helpers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from attrib.backbones.build import BackboneSizes, build_backbone
from attrib.backbones.loader import load_backbone, model_fingerprint, read_manifest
from attrib.errors import ArtifactError

MODELS = Path(__file__).resolve().parents[3] / "attrib" / "defaults" / "models"


def test_loaded_weights_equal_built(tiny_dirs, tiny_tokenizer):
    built, _ = build_backbone("llava", BackboneSizes(), tiny_tokenizer, seed=0)
    loaded = load_backbone("llava", tiny_dirs["llava"])
    for (name, a), (_, b) in zip(built.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not loaded.model.training


def test_unpacks_as_model_processor_spec(tiny_dirs):
    model, processor, spec = load_backbone("blip2", tiny_dirs["blip2"])
    assert spec.name == "blip2" and type(model).__name__ == spec.model_class
    assert callable(processor)


def test_unknown_name_lists_choices(tiny_dirs):
    with pytest.raises(ValueError, match="choose one of: blip2, llava, minigpt4"):
        load_backbone("llava-next", tiny_dirs["llava"])


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing}: not a directory"):
        load_backbone("llava", missing)


def test_folder_without_config_or_weights(tmp_path, tiny_dirs):
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        load_backbone("llava", tmp_path)
    shutil.copy(tiny_dirs["llava"] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_backbone("llava", tmp_path)


@pytest.mark.parametrize("name,folder", [("blip2", "llava"), ("minigpt4", "blip2"), ("llava", "minigpt4")])
def test_wrong_architecture_is_refused(tiny_dirs, name, folder):
    with pytest.raises(ValueError, match="expects"):
        load_backbone(name, tiny_dirs[folder])


def test_manifest_template_overrides_spec(tmp_path, tiny_dirs):
    shutil.copytree(tiny_dirs["llava"], tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"prompt_template": "<image>\nQ: {prompt} A:"}))
    backbone = load_backbone("llava", tmp_path / "m")
    assert backbone.format_prompt("hi") == "<image>\nQ: hi A:"
    assert backbone.format_prompt("hi", with_image=False) == "USER: hi ASSISTANT:"


def test_fingerprint_tracks_weights(tmp_path, tiny_dirs, tiny_tokenizer):
    first = model_fingerprint(tiny_dirs["llava"])
    assert first == load_backbone("llava", tiny_dirs["llava"]).fingerprint()
    model, processor = build_backbone("llava", BackboneSizes(), tiny_tokenizer, seed=1)
    model.save_pretrained(tmp_path)
    assert model_fingerprint(tmp_path) != first


def test_half_precision_loads_keep_the_qformer_in_fp32_only_for_fp16(tiny_dirs):
    """transformers keeps BLIP-2's Q-Former and query tokens in float32 when it loads the model in fp16, and
    casts them like every other weight in bf16 (full-size runs in bf16 therefore run the Q-Former in bf16)."""
    half = load_backbone("blip2", tiny_dirs["blip2"], dtype=torch.float16).model
    assert half.query_tokens.dtype == half.qformer.layernorm.weight.dtype == torch.float32
    assert half.language_model.lm_head.weight.dtype == torch.float16
    bf16 = load_backbone("blip2", tiny_dirs["blip2"], dtype=torch.bfloat16).model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def llava_copy(tmp_path_factory, tiny_dirs):
    """A copy of the tiny LLaVA folder whose manifest.json and config.json the tests rewrite."""
    folder = tmp_path_factory.mktemp("llava-copy") / "m"
    shutil.copytree(tiny_dirs["llava"], folder)
    return folder


def _one_line_naming(error: Exception, path) -> str:
    message = str(error)
    assert isinstance(error, ArtifactError) and len(message.splitlines()) == 1 and str(path) in message, message
    return message


@pytest.mark.parametrize("content,message", [
    (b"[]", "expected an object, found a list"),
    (b'{"prompt_template": 3}', r"field 'prompt_template': expected a string, found a whole number"),
    (b'{"prompt_template": "USER: <image>', "not valid JSON"),
    (b'\xff{"prompt_template": ""}', "not UTF-8 text at byte 0"),
    (b'{"prompt_template": "USER: <image> ASSISTANT:"}', r"field 'prompt_template': .* holding \{prompt\}"),
    (b'{"text_template": "{prompt} {answer}"}', r"field 'text_template': .* no other field"),
    (b'{"text_template": "{prompt[x]}"}', r"field 'text_template'"),
    (b'{"text_template": "{{prompt}}"}', r"field 'text_template'"),  # braces escaped: no field at all
    (b'{"prompt_template": null}', r"field 'prompt_template': expected a string, found null"),
])
def test_malformed_manifest_is_named_before_the_weights_load(llava_copy, monkeypatch, content, message):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the manifest was checked")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", no_weights)
    manifest = llava_copy / "manifest.json"
    manifest.write_bytes(content)
    try:
        with pytest.raises(ArtifactError, match=message) as error:
            load_backbone("llava", llava_copy)
        _one_line_naming(error.value, manifest)
    finally:
        manifest.unlink()


@pytest.mark.parametrize("mutate,message", [
    (lambda config: [config], "expected an object, found a list"),
    (lambda config: {**config, "architectures": "LlavaForConditionalGeneration"},
     r"field 'architectures': expected a list, found a string"),
    (lambda config: {**config, "text_config": ["llama"]}, r"field 'text_config': expected an object, found a list"),
    (lambda config: {**config, "text_config": {**config["text_config"], "model_type": 7}},
     r"field 'text_config', field 'model_type': expected a string"),
])
def test_malformed_config_is_named(llava_copy, tiny_dirs, mutate, message):
    config_file = llava_copy / "config.json"
    original = json.loads((tiny_dirs["llava"] / "config.json").read_text())
    try:
        config_file.write_text(json.dumps(mutate(original)))
        with pytest.raises(ArtifactError, match=message) as error:
            load_backbone("llava", llava_copy)
        _one_line_naming(error.value, config_file)
        config_file.write_bytes(b'{"architectures": ["Llava')
        with pytest.raises(ArtifactError, match="config.json: not valid JSON"):
            load_backbone("llava", llava_copy)
    finally:
        shutil.copy(tiny_dirs["llava"] / "config.json", config_file)


SHIPPED_MANIFEST = json.loads((MODELS / "llava" / "manifest.json").read_text())
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
TEMPLATES = st.text(max_size=20) | st.sampled_from(["{prompt}", "{prompt} {x}", "{", "}{prompt}", "{0}{prompt}",
                                                    "{prompt!r}", "{prompt:>{w}}", "{prompt.upper}", "{{prompt}}"])


def _manifest_reads_or_names(folder) -> None:
    try:
        manifest = read_manifest(folder)
    except ArtifactError as error:
        _one_line_naming(error, folder / "manifest.json")
        event("refused")
        return
    event("read")
    for key in ("prompt_template", "text_template"):  # what is let through formats a prompt
        template = manifest.get(key)
        assert not template or "hi" in template.format(prompt="hi")


@given(document=JSON | st.fixed_dictionaries({"prompt_template": TEMPLATES, "text_template": TEMPLATES}))
def test_fuzz_manifest_documents(tmp_path_factory, document):
    folder = tmp_path_factory.getbasetemp() / "manifest-documents"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(document))
    _manifest_reads_or_names(folder)


@given(key=st.sampled_from([*SHIPPED_MANIFEST, "prompt_template", "text_template"]), value=TEMPLATES | JSON)
def test_fuzz_manifest_one_field_replaced(tmp_path_factory, key, value):
    folder = tmp_path_factory.getbasetemp() / "manifest-fields"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({**SHIPPED_MANIFEST, key: value}))
    _manifest_reads_or_names(folder)


@given(at=st.integers(0, 1 << 16), flips=st.lists(st.integers(0, 1 << 20), max_size=3))
def test_fuzz_manifest_damaged_bytes(tmp_path_factory, at, flips):
    folder = tmp_path_factory.getbasetemp() / "manifest-bytes"
    folder.mkdir(exist_ok=True)
    data = bytearray((MODELS / "llava" / "manifest.json").read_bytes()[:at])
    for bit in flips if data else []:
        data[(bit // 8) % len(data)] ^= 1 << (bit % 8)
    (folder / "manifest.json").write_bytes(bytes(data))
    _manifest_reads_or_names(folder)
