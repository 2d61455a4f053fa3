"""The full-size smoke test: its configs at the published sizes (on the meta device) and its steps on the
tiny models (the full sizes need ~16 GB of RAM; `visedit smoke-full` runs them)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from attrib.backbones.spec import IMAGE_PLACEHOLDER, get_spec
from attrib.defaults import DEFAULTS_DIR
from benchmarks.smoke_full import FULL_VOCAB, full_config, paper_layers, run_smoke

# Parameters of the published architectures with these vocabularies (LLaVA-1.5-7B: 7.06 B).
SIZES = {"llava": (7.0e9, 7.1e9), "blip2": (3.7e9, 3.9e9), "minigpt4": (7.7e9, 8.0e9)}


@pytest.mark.parametrize("name", sorted(FULL_VOCAB))
def test_full_configs_have_the_published_sizes(name):
    tokenizer = AutoTokenizer.from_pretrained(DEFAULTS_DIR / name, local_files_only=True)
    config = full_config(name, tokenizer)
    spec = get_spec(name)
    with torch.device("meta"):
        model = getattr(transformers, spec.model_class)(config)
    low, high = SIZES[name]
    assert low < sum(p.numel() for p in model.parameters()) < high
    assert model.get_input_embeddings().weight.shape[0] == FULL_VOCAB[name]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) < len(tokenizer)
    assert config.text_config.num_hidden_layers == 32
    assert spec.n_visual_tokens(config) == (576 if name == "llava" else 32)
    assert spec.grid_shape(config) == ((24, 24) if name == "llava" else (16, 16))


def test_paper_layers_are_clipped_to_small_models():
    assert paper_layers("llava", 32) == (18, list(range(19, 31)))
    assert paper_layers("blip2", 32)[0] == 19 and paper_layers("minigpt4", 32)[0] == 17
    assert paper_layers("llava", 2) == (0, [1])


@pytest.mark.parametrize("name", ["llava", "blip2"])
def test_every_step_runs_on_a_tiny_model(name, tiny_dirs, tmp_path):
    report = run_smoke(name, tmp_path, draws=1, train_steps=1, progress=False, folder=tiny_dirs[name])
    assert json.loads((tmp_path / "smoke.json").read_text()) == report
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == ["load", "contribution", "region_sweep", "placement", "train", "edit", "evaluate"]
    assert all(step["wall_s"] >= 0 and step["peak_rss_mb"] > 0 for step in steps.values())
    assert steps["contribution"]["dla_sum_minus_logit"] < 1e-3
    assert steps["region_sweep"]["finite"] and steps["train"]["finite"]
    assert steps["edit"]["restore_bit_exact"] and steps["evaluate"]["n_eval"] == 2
    assert steps["placement"]["source"].startswith("the paper's layers")
    assert (tmp_path / "attribution" / "attribution.json").is_file()
