"""The benchmark runner in quick mode: tiny shapes, one repeat, the JSON it writes and map agreement."""
from __future__ import annotations

import json

import pytest

from attrib.regions.regions import grid_windows
from benchmarks.bench import BENCHMARKS, BenchOutput, Goal, format_table, register, run_benchmarks
from benchmarks.cases import spread_subset
from visedit.cli import main

REQUIRED = ("region_sweep_speedup", "region_sweep_max_abs_diff", "trace_overhead", "region_subset",
            "vead_inference_overhead", "vead_prefix_speedup")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    report = run_benchmarks(out, repeats=1, quick=True, default_model=out / "no-default-model")
    return out, report


def test_quick_run_writes_required_keys(quick_report):
    out, report = quick_report
    written = json.loads((out / "bench.json").read_text())
    assert set(REQUIRED) <= set(written)
    assert written["machine"]["torch_threads"] >= 1 and written["mode"] == "quick"
    assert written["region_sweep_speedup"] > 0 and written["trace_overhead"] > 0
    sweep = written["details"]["random_llava"]["region_sweep"]
    assert sweep["timings"]["naive_subset"]["samples_s"] and sweep["engine_s_per_region"] > 0


def test_engine_and_naive_maps_agree(quick_report):
    _, report = quick_report
    assert report["region_sweep_max_abs_diff"] <= 1e-4
    # A meaningful comparison: the maps themselves are far from zero.
    assert report["details"]["random_llava"]["region_sweep"]["map_mean"] > 1e-4


def test_vead_figures_compare_like_with_like(quick_report):
    _, report = quick_report
    vead = report["details"]["vead_random_llava"]["vead"]
    assert report["vead_inference_overhead"] > 0 and report["vead_prefix_speedup"] > 0
    assert vead["n_layers"] == 3 and vead["edit_layer"] == 1
    assert vead["step_loss_abs_diff"] < 1e-4  # both training steps compute the same loss
    assert vead["edited_logit_max_change"] > 0  # the edited forward really went through the adapter
    assert "vead_inference_overhead" in report["goals"]


def test_missing_default_model_is_skipped_with_a_note(quick_report):
    _, report = quick_report
    assert not any(key.startswith("default_") for key in report)
    assert any("default model skipped" in note for note in report["notes"])
    assert "region_sweep_speedup" in format_table(report)


def test_registered_benchmark_adds_keys_and_goals(tmp_path, monkeypatch):
    monkeypatch.setattr("benchmarks.bench.BENCHMARKS", {})

    @register("editing_stub", goals={"edit_speed": Goal("≥", 2.0)})
    def stub(ctx) -> BenchOutput:
        return BenchOutput({"edit_speed": 3.0}, {"repeats": ctx.repeats}, ["stub ran"])

    with pytest.raises(ValueError, match="twice"):
        register("editing_stub")(stub)
    report = run_benchmarks(tmp_path, repeats=2, quick=True)
    assert report["edit_speed"] == 3.0 and report["goals"]["edit_speed"]["met"]
    assert report["details"]["editing_stub"] == {"repeats": 2} and "stub ran" in report["notes"]


def test_cli_only_and_subset(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("benchmarks.bench.BENCHMARKS", {k: v for k, v in BENCHMARKS.items() if k == "default_llava"})
    assert main(["bench", "--quick", "--out", str(tmp_path), "--only", "default_llava",
                 "--default-model", str(tmp_path / "missing")]) == 0
    assert (tmp_path / "bench.json").is_file() and "skipped" in capsys.readouterr().out
    subset, picks = spread_subset(grid_windows(24, 24, 3, "lm"), 48)
    assert subset.n_regions == 48 and picks[0] == 0 and picks[-1] == 575 and len(set(picks)) == 48
