"""`visedit bench-gpu`: the same code as at full size, run at the reduced size on a CPU (the full sizes need
a GPU): every field reported, every timing a positive finite number, the grids and layers of the reduced
models."""
from __future__ import annotations

import json
import math

import pytest
import torch

from attrib.regions import lm_regions, vit_regions
from benchmarks.gpu import (
    BACKBONES,
    FIELDS,
    GOALS,
    REDUCED_SIZES,
    TRAIN_BATCH,
    build,
    format_table,
    projection,
    run_bench_gpu,
)
from visedit.cli import parser

TIMINGS = ("build_s", "contribution_s_per_sample", "region_sweep_s_per_sample", "train_step_s", "products_s",
           "forward_unedited_s", "forward_edited_s", "edited_over_unedited")


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-gpu")
    report = run_bench_gpu(BACKBONES, out, size="reduced", device="cpu", train_steps=2, repeats=2, progress=False)
    return report, out


def test_every_backbone_reports_every_field(reduced):
    report, out = reduced
    assert json.loads((out / "bench_gpu.json").read_text()) == report
    assert report["size"] == "reduced" and report["device"] == "cpu" and report["dtype"] == "bfloat16"
    for name in BACKBONES:
        row = report["backbones"][name]
        assert set(FIELDS) <= set(row), name
        assert row["device_name"] == "cpu" and row["samples"] == TRAIN_BATCH
        assert row["parameters"] > 0 and row["adapter_parameters"] > 0 and row["peak_memory_bytes"] > 0


def test_timings_are_positive_and_finite(reduced):
    report, _ = reduced
    for name, row in report["backbones"].items():
        for key in TIMINGS:
            assert math.isfinite(row[key]) and row[key] >= 0, (name, key, row[key])
        assert all(s > 0 for s in row["train_step_each_s"]) and row["train_steps_timed"] == 2
        assert row["contribution_s_per_sample"] > 0 and row["region_sweep_s_per_sample"] > 0
        assert row["forward_edited_s"] > 0 and row["forward_unedited_s"] > 0 and row["edited_over_unedited"] > 0


def test_grids_and_layers_are_the_reduced_ones(reduced):
    report, _ = reduced
    side = REDUCED_SIZES.image_size // REDUCED_SIZES.patch_size
    for name, row in report["backbones"].items():
        assert row["grid"] == [side, side] and row["n_regions"] == side * side
        assert row["grid_site"] == ("lm" if name == "llava" else "vit")
        assert row["n_layers"] == REDUCED_SIZES.text_layers
        assert row["sweep_layers"] == list(range(REDUCED_SIZES.text_layers)) and row["sweep_finite"]
        assert row["train_batch"] == TRAIN_BATCH and row["placement"]["edit_layer"] < row["n_layers"]


def test_goals_carry_no_verdict_below_full_size(reduced):
    report, _ = reduced
    rows = report["backbones"]
    assert set(rows["llava"]["goals"]) == set(GOALS)
    assert "region_sweep_s_per_sample" not in rows["blip2"]["goals"]  # set for LLaVA-1.5-7B only
    assert all(goal["met"] is None for row in rows.values() for goal in row["goals"].values())
    table = format_table(report)
    assert all(name in table for name in BACKBONES) and "MISSED" not in table and "reduced size" in table


@pytest.mark.parametrize("name", BACKBONES)
def test_the_full_size_builds_the_published_grid(name):
    """The full-size path on the meta device (shapes only): 32 LM layers, 24 × 24 LM tokens or 16 × 16 patches."""
    backbone = build(name, "full", torch.device("meta"), torch.bfloat16)
    lm_grid = backbone.spec.grid_site == "lm"
    regions = lm_regions(backbone) if lm_grid else vit_regions(backbone)
    assert backbone.n_layers == 32 and backbone.model.dtype == torch.bfloat16
    assert regions.shape == ((24, 24) if name == "llava" else (16, 16)) and regions.site == ("lm" if lm_grid else "vit")


def test_projection_of_the_official_schedule():
    plan = projection(0.5)
    assert plan["steps_per_epoch"] == 1587 and plan["official_epochs"] == 1000
    assert plan["epoch_h"] == pytest.approx(1587 * 0.5 / 3600)
    assert plan["official_h"] == pytest.approx(1000 * plan["epoch_h"])


def test_the_command_is_registered_and_checks_its_arguments(tmp_path):
    args = parser().parse_args(["bench-gpu", "--backbone", "llava", "--size", "reduced", "--device", "cpu"])
    assert args.run.__name__ == "bench_gpu" and args.dtype == "bfloat16" and args.samples == TRAIN_BATCH
    with pytest.raises(ValueError, match="samples"):
        run_bench_gpu(["llava"], tmp_path, samples=TRAIN_BATCH - 1)
    with pytest.raises(ValueError, match="size"):
        run_bench_gpu(["llava"], tmp_path, size="half")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            run_bench_gpu(["llava"], tmp_path, device="cuda")
