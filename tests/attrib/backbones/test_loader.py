"""load_backbone: the real loading path, its errors, and the Backbone helpers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from attrib.backbones.build import BackboneSizes, build_backbone
from attrib.backbones.loader import load_backbone, model_fingerprint


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
