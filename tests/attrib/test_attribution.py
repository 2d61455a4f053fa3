"""The attribution pipeline end to end on a tiny model and a small world, and its bad-input errors."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from attrib.attribution import ARTIFACT_JSON, ARTIFACT_TENSORS, AttributionConfig, run_attribution
from attrib.data import DataError, load_records
from attrib.world import write_world

JSON_KEYS = {"backbone", "model", "dataset", "n_samples", "key_token", "contribution", "regions", "placement"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("w") / "world", seed=3, n_train=4, n_eval=6, n_caption_train=2,
                       n_caption_eval=2)


def test_pipeline_writes_artifact_and_figures(tiny_backbone, world, tmp_path):
    records = load_records(world / "vqa_eval.json", n=3)
    config = AttributionConfig(draws=2, causal_samples=1, causal_draws=1, window=1)
    attribution = run_attribution(tiny_backbone, records, config, dataset="world")
    attribution.save(tmp_path)
    figures = attribution.plot_all(tmp_path, n_overlays=1)
    data = json.loads((tmp_path / ARTIFACT_JSON).read_text())
    assert JSON_KEYS <= set(data)
    assert set(data["model"]) == {"path", "fingerprint"} and data["n_samples"] == 3
    assert len(data["contribution"]["attn"]) == tiny_backbone.n_layers
    assert set(data["regions"]) == {"grid", "method", "sigma", "draws", "window", "seed", "layers"}
    assert data["placement"]["it_layers"][-1] == tiny_backbone.n_layers - 1
    assert data["placement"]["edit_layer"] == data["placement"]["it_layers"][0] - 1
    tensors = load_file(tmp_path / ARTIFACT_TENSORS)
    assert tensors[f"regions.{data['regions']['method']}"].shape[:2] == (3, tiny_backbone.n_layers)
    assert all(p.stat().st_size > 0 for p in figures)


def test_progress_bars_follow_the_flag(tiny_backbone, world, capsys):
    records = load_records(world / "vqa_eval.json", n=2)
    config = AttributionConfig(draws=1, causal_samples=1, causal_draws=1, batch_size=1)  # > 1 batch: a bar
    run_attribution(tiny_backbone, records, config, progress=False)
    assert "%|" not in capsys.readouterr().err  # `visedit edit --no-progress` prints no bar
    run_attribution(tiny_backbone, records, config)
    assert "contribution" in capsys.readouterr().err


def test_bad_records_are_named(world, tmp_path):
    records = json.loads((world / "vqa_eval.json").read_text())
    del records[1]["alt"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"bad.json: record 1: missing field 'alt'"):
        load_records(bad, world)
    with pytest.raises(DataError, match="N=99 is larger than the dataset"):
        load_records(world / "vqa_eval.json", n=99)
    records = load_records(world / "vqa_eval.json", tmp_path)  # wrong image root
    with pytest.raises(DataError, match=r"record 0, field 'image': image not found"):
        records[0].load_image()


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    from visedit.cli import main

    code = main(["heatmaps", "--model", str(tmp_path / "nope"), "--data", str(world / "vqa_eval.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err


def test_prompt_without_visual_tokens_is_named(tiny_dirs, world, tmp_path):
    import shutil

    from attrib.backbones.loader import load_backbone

    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs["minigpt4"], folder)
    (folder / "manifest.json").write_text(json.dumps({"prompt_template": "###Human: {prompt} ###Assistant:"}))
    backbone = load_backbone("minigpt4", folder)  # a template that lost its image placeholder
    records = load_records(world / "vqa_eval.json", n=2)
    with pytest.raises(DataError, match=r"vqa_eval.json: record 0, field 'src': .*placeholder"):
        run_attribution(backbone, records, AttributionConfig(draws=1, causal_samples=1, causal_draws=1))
