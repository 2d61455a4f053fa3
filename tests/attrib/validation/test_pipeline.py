"""The validation run, its files and its command (`attrib.validation.pipeline`, ``visedit validate``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from attrib.config import AttributionConfig
from attrib.data import load_records
from attrib.validation.pipeline import select_records, validate, write_validation
from attrib.validation.scoring import count_objects
from visedit.cli import main

FAST = AttributionConfig(draws=2, causal_samples=1, causal_draws=1, window=1)
METHOD_KEYS = {"pointing_game", "mass_in_box", "best_layers", "per_layer", "per_family", "per_question"}


def test_validation_json_has_the_required_keys(tiny_backbone, world, tmp_path):
    records = load_records(world / "vqa_eval.json", n=3)
    result = validate(tiny_backbone, records, FAST, ig_steps=2, correct_only=False)
    assert result.n_samples == sum(r.box("image") is not None for r in records)
    write_validation(result, tmp_path)
    data = json.loads((tmp_path / "validation.json").read_text())
    assert set(data) == {"backbone", "n_samples", "questions", "methods", "baselines", "meta"}
    assert len(data["questions"]) == data["n_samples"] and all(q["question"] for q in data["questions"])
    assert set(data["baselines"]) == {"random_cell", "random_object"}
    baselines = {"integrated_gradients", "layer_integrated_gradients", "raw_attention", "causal_noise"}
    assert baselines <= set(data["methods"])
    primary = "attention_noise" if tiny_backbone.spec.grid_site == "lm" else "vit_noise"
    assert {primary, primary + "_cell"} <= set(data["methods"])  # window 1, so the single-cell run joins
    assert data["meta"]["methods"][primary + "_cell"]["window"] == 0
    if primary == "vit_noise":  # Q-Former backbones: both reads of the ViT noise, on single patches
        assert data["meta"]["methods"]["vit_noise_cell"]["read"] == "local"
        assert data["meta"]["methods"]["vit_noise_propagated_cell"]["read"] == "propagated"
        assert data["meta"]["methods"]["query_noise_patches"]["name"] == "attention_noise"  # per-query, placed
        assert len(data["methods"]["query_noise_patches"]["per_layer"]["layers"]) == tiny_backbone.n_layers
    else:
        assert not any(name.startswith("query_noise") for name in data["methods"])
    for name, entry in data["methods"].items():
        assert set(entry) == METHOD_KEYS, name
        assert 0 <= entry["pointing_game"] <= 100 and 0 <= entry["mass_in_box"] <= 100
        if entry["per_layer"] is not None:
            layers = entry["per_layer"]["layers"]  # the causal effect runs on every k-th layer only
            assert set(layers) <= set(range(tiny_backbone.n_layers))
            assert len(entry["best_layers"]) == min(3, len(layers))
            assert len(entry["per_layer"]["pointing_game"]) == len(layers)
        assert len(entry["per_question"]) == data["meta"]["samples_per_method"][name]
    assert (tmp_path / "validation.png").stat().st_size > 0
    assert "| raw_attention |" in (tmp_path / "validation.md").read_text()


def test_selection_filters(tiny_dirs, world):
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("blip2", tiny_dirs["blip2"])
    records = load_records(world / "vqa_eval.json")
    every, _, _, _ = select_records(backbone, records, correct_only=False)
    right, _, _, counts = select_records(backbone, records, correct_only=True)
    crowded, images, _, _ = select_records(backbone, records, correct_only=False, min_objects=3)
    assert every == [r for r in records if r.box("image") is not None]
    assert set(r.index for r in right) <= set(r.index for r in every) and counts["answered_right"] == len(right)
    assert all(count_objects(im) >= 3 for im in images) and len(crowded) <= len(every)


def test_cli_writes_the_files(tiny_dirs, world, tmp_path, capsys):
    argv = ["validate", "--backbone", "llava", "--model", str(tiny_dirs["llava"]),
            "--data", str(world / "vqa_eval.json"), "--n", "2", "--out", str(tmp_path), "--all-answers",
            "--ig-steps", "2"]
    assert main(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"validation.json", "validation.png", "validation.md"}
    assert "validation.json" in capsys.readouterr().out
    assert main(argv + ["--min-objects", "9"]) == 2  # nothing left: a one-line error
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: loading progress bars
    assert err.startswith("error: no record left") and "with 9+ objects: 0" in err


def test_importing_the_library_keeps_the_users_matplotlib_backend():
    # A notebook's inline backend must survive `import attrib...` (only the command lines pick Agg).
    code = ("import matplotlib, attrib.attribution, attrib.validation, attrib.contribution, attrib.regions.result, "
            "editing.evaluation.localisation, editing.command.run; print(matplotlib.get_backend())")
    env = {**os.environ, "MPLBACKEND": "svg"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().lower() == "svg"
