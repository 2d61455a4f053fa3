"""The edit pipeline / CLI on a tiny model and a tiny world: results structure (not quality), the
checkpoint and attribution paths, captions, and bad records (one-line error, --skip-bad)."""
from __future__ import annotations

import json
import shutil

import pytest

from visedit.cli import main

VISEDIT_KEYS = {"rel", "t_gen", "m_gen", "t_loc", "m_loc", "exact_match", "secondary", "m_loc_same_object",
                "m_loc_other", "im_pointing_game", "im_gate_mean", "scene_gate", "scene_similarity", "scene_gate_mean",
                "target_role", "loc_same_image", "n_same_image", "targets"}
QUIET = ["--no-progress", "--mid-dim", "16"]


@pytest.fixture(scope="module")
def trained(tiny_dirs, tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit") / "llava"
    code = main(["edit", "--backbone", "llava", "--model", str(tiny_dirs["llava"]), "--train",
                 str(tiny_world / "vqa_train.json"), "--eval", str(tiny_world / "vqa_eval.json"), "--steps", "2",
                 "--batch-size", "2", "--out", str(out), *QUIET])
    assert code == 0
    return out


def test_results_have_the_required_keys(trained, tiny_dirs):
    results = json.loads((trained / "results.json").read_text())
    assert {"backbone", "dataset", "n_eval", "placement", "methods", "timing"} <= set(results)
    assert results["backbone"] == "llava" and results["n_eval"] == 3
    assert results["model"]["dtype"] == "float32" and results["model"]["device"] == "cpu"  # --dtype/--device auto
    assert {"edit_layer", "it_layers", "im_read_layer", "ceiling", "source"} <= set(results["placement"])
    assert VISEDIT_KEYS <= set(results["methods"]["visedit"])
    assert set(results["timing"]) == {"train_s", "edit_ms", "inference_overhead"}
    assert results["timing"]["train_s"] > 0 and results["train"]["steps"] == 2
    assert 0 < results["train"]["products_s"] < results["timing"]["train_s"]
    assert results["train"]["config"]["lr"] == 1e-3  # no --lr: the small-LM default
    for name in ("results.md", "adapter.safetensors", "im_maps.png", "attribution/attribution.json",
                 "attribution/placement.png", "checkpoint/train_state.json"):
        assert (trained / name).is_file(), name
    assert "| VisEdit |" in (trained / "results.md").read_text()
    gate = results["methods"]["visedit"]["im_gate_mean"]
    assert set(gate) == {"edit_image", "unrelated_image"} and all(0 < v < 1 for v in gate.values())
    # The scene gate is on by default; its means are read on re-rendered and unrelated images.
    assert results["methods"]["visedit"]["scene_gate"] is True and results["adapter"]["config"]["scene_gate"]
    assert results["methods"]["visedit"]["scene_similarity"] == "salient"
    scene = results["methods"]["visedit"]["scene_gate_mean"]
    assert set(scene) == {"image_rephrase", "m_loc"} and all(0 < v < 1 for v in scene.values())
    # So is the target role (VEAD's keys mark the edit's target tokens).
    assert results["methods"]["visedit"]["target_role"] is True and results["adapter"]["config"]["target_role"]


def test_checkpoint_evaluates_without_training_and_captions(trained, tiny_dirs, tiny_world, tmp_path):
    common = ["edit", "--backbone", "llava", "--model", str(tiny_dirs["llava"]), "--checkpoint",
              str(trained / "adapter.safetensors"), *QUIET]
    assert main([*common, "--eval", str(tiny_world / "caption_eval.json"), "--task", "caption",
                 "--out", str(tmp_path / "c")]) == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["timing"]["train_s"] is None and results["train"] is None
    assert results["placement"]["source"].startswith("adapter metadata")
    assert results["methods"]["visedit"]["im_pointing_game"] is None  # captions carry no boxes
    assert not (tmp_path / "c" / "attribution").exists()
    assert results["methods"]["visedit"]["scene_gate"] is True  # read from the adapter file, not the flag


def test_no_scene_gate_no_target_role_trains_the_papers_adapter(trained, tiny_dirs, tiny_world, tmp_path):
    code = main(["edit", "--backbone", "llava", "--model", str(tiny_dirs["llava"]), "--train",
                 str(tiny_world / "vqa_train.json"), "--eval", str(tiny_world / "vqa_eval.json"), "--steps", "1",
                 "--batch-size", "2", "--attribution", str(trained / "attribution"),
                 "--no-scene-gate", "--no-target-role",
                 "--out", str(tmp_path / "plain"), *QUIET])
    assert code == 0
    visedit = json.loads((tmp_path / "plain" / "results.json").read_text())["methods"]["visedit"]
    assert visedit["scene_gate"] is False and visedit["scene_gate_mean"] is None
    assert visedit["target_role"] is False


def test_placement_from_a_given_artifact(trained, tiny_dirs, tiny_world, tmp_path):
    code = main(["edit", "--backbone", "llava", "--model", str(tiny_dirs["llava"]), "--train",
                 str(tiny_world / "vqa_train.json"), "--eval", str(tiny_world / "vqa_eval.json"), "--steps", "1",
                 "--attribution", str(trained / "attribution"), "--out", str(tmp_path / "a"), *QUIET])
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert code == 0 and results["placement"]["source"].endswith("attribution.json")


def test_bad_records_stop_in_one_line_or_are_skipped(trained, tiny_dirs, tiny_world, tmp_path, capsys):
    records = json.loads((tiny_world / "vqa_eval.json").read_text())
    records[1]["image"] = "images/nowhere.png"
    bad = tmp_path / "vqa_eval.json"
    bad.write_text(json.dumps(records))
    shutil.copytree(tiny_world / "images", tmp_path / "images")
    common = ["edit", "--backbone", "llava", "--model", str(tiny_dirs["llava"]), "--checkpoint",
              str(trained / "adapter.safetensors"), "--eval", str(bad), "--out", str(tmp_path / "o"), *QUIET]
    assert main(common) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # no loading bars
    assert len(errors) == 1 and errors[0].startswith("error:") and "record 1, field 'image'" in errors[0]
    assert "images/nowhere.png" in errors[0]
    assert main([*common, "--skip-bad"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["n_skipped"] == {"train": 0, "eval": 1} and results["n_eval"] == 2


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["edit", "--backbone", "llava", "--model", str(tmp_path / "none"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_unknown_backbone_lists_the_choices_and_no_progress_silences_transformers(capsys):
    from transformers.utils import logging as hf_logging

    try:
        assert main(["edit", "--backbone", "gpt", "--no-progress"]) == 2
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown backbone 'gpt'; choose one of: blip2, llava, minigpt4"


def test_a_bf16_backbone_runs_the_whole_pipeline_with_float32_adapter_weights(tiny_dirs, tiny_world, tmp_path):
    """--dtype bfloat16 on the CPU: attribution for the placement (every region method of the Q-Former family,
    where a bf16 bug was found), training and evaluation run on the half-precision backbone; the adapter
    keeps float32 master weights."""
    from safetensors.torch import load_file

    backbone = "minigpt4"
    out = tmp_path / backbone
    assert main(["edit", "--backbone", backbone, "--model", str(tiny_dirs[backbone]), "--dtype", "bfloat16",
                 "--device", "cpu", "--train", str(tiny_world / "vqa_train.json"), "--eval",
                 str(tiny_world / "vqa_eval.json"), "--steps", "1", "--batch-size", "2", "--n-eval", "2", "--out",
                 str(out), *QUIET]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["dtype"] == "bfloat16" and results["n_eval"] == 2
    assert {str(t.dtype) for t in load_file(out / "adapter.safetensors").values()} == {"torch.float32"}


def test_an_edit_evaluated_as_two_processes_reports_what_one_process_reports(trained, tiny_dirs, tiny_world,
                                                                             tmp_path):
    """`visedit edit --checkpoint` under ``accelerate launch`` (two CPU processes): the edits are dealt out,
    each process restores after each of its edits, and the main process writes scores equal to one
    process's."""
    from tests.launch import launch, run_alone

    args = ["-m", "visedit.cli", "edit", "--backbone", "llava", "--model", str(tiny_dirs["llava"]), "--eval",
            str(tiny_world / "vqa_eval.json"), "--checkpoint", str(trained / "adapter.safetensors")]
    run_alone(*args, "--out", str(tmp_path / "one"), "--no-progress")
    shared = launch(*args, "--out", str(tmp_path / "two"))
    assert "edit / measure / restore (process 1 of 2)" in shared.stderr  # both processes edited
    assert "edit / measure / restore (process 0 of 2)" in shared.stderr
    assert shared.stdout.count("results in") == 1
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert two["n_eval"] == one["n_eval"] == 3
    assert {k: two["methods"]["visedit"][k] for k in VISEDIT_KEYS} == {k: one["methods"]["visedit"][k]
                                                                       for k in VISEDIT_KEYS}
