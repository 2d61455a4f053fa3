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


def test_a_work_folder_keeps_chunks_that_only_the_same_run_reuses(tiny_dirs, world, tmp_path, monkeypatch):
    """Chunked with a work folder, the artifact equals the one without; a rerun of the same run reads every
    chunk back (computing nothing); any other run (here another seed) starts afresh and clears the old."""
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    import attrib.attribution as pipeline
    from attrib.backbones.loader import load_backbone
    from attrib.contribution import contribution
    from attrib.prompts import load_prompts
    from attrib.regions.registry import methods_for
    from attrib.regions.sweep import region_sweep

    backbone = load_backbone("llava", tiny_dirs["llava"])
    records, everything = load_records(world / "vqa_eval.json", n=3), load_records(world / "vqa_eval.json")
    config = AttributionConfig(draws=1, causal_samples=2, causal_draws=1, window=1, batch_size=2, ceiling_samples=2)
    work = tmp_path / "work"

    def artifact(attribution, folder):
        attribution.save(folder)
        return json.loads((folder / ARTIFACT_JSON).read_text()), load_file(folder / ARTIFACT_TENSORS)

    def attribute(config=config, **kwargs):
        return run_attribution(backbone, records, config, ceiling_records=everything, progress=False, **kwargs)

    plain = artifact(attribute(), tmp_path / "plain")
    kept = artifact(attribute(work=work), tmp_path / "kept")
    [key] = list(work.iterdir())
    assert {p.name.rsplit("-", 1)[0] for p in key.iterdir()} >= {"contribution", "regions-attention_noise",
                                                                  "regions-causal_noise", "ceiling"}
    for name in ("plain", "kept"):
        assert not list((tmp_path / name).glob(".*"))  # no lock or temporary file left behind
    assert plain[0]["details"]["ceiling"]["n"] == 2
    # Chunks are the batches of one pass: the same numbers as one call over every record.
    prompts = [load_prompts()["vqa"].format(src=r.src) for r in records]
    images = [r.load_image("image") for r in records]
    whole = contribution(backbone, images, prompts, batch_size=2, progress=False).to_tensors()
    assert all(torch.equal(plain[1][f"contribution.{k}"], whole[k]) for k in whole)
    entry = methods_for(backbone)[0]
    maps = region_sweep(backbone, images, prompts, entry.method(config), entry.regions(backbone, config),
                        range(backbone.n_layers), batch_size=2, progress=False).maps
    assert torch.equal(plain[1][f"regions.{entry.name}"], maps)
    assert kept[0] == plain[0] and kept[1].keys() == plain[1].keys()
    assert all(torch.equal(kept[1][k], plain[1][k]) for k in plain[1])

    def never(*args, **kwargs):
        raise AssertionError("computed again")

    for name in ("contribution", "region_sweep", "visual_patching_ceiling"):
        monkeypatch.setattr(pipeline, name, never)
    again = artifact(attribute(work=work), tmp_path / "again")
    assert again[0] == plain[0] and all(torch.equal(again[1][k], plain[1][k]) for k in plain[1])
    monkeypatch.undo()
    attribute(replace(config, seed=1), work=work)
    assert [p.name for p in work.iterdir()] != [key.name] and len(list(work.iterdir())) == 1
