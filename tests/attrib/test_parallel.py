"""Sharding over processes: the shares, the identity alone, and `visedit heatmaps` under
``accelerate launch`` with two CPU processes writing the artifact one process writes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from attrib.parallel import Processes, finish, gather, launched, processes, sum_
from attrib.world import write_world
from tests.launch import launch, run_alone


def test_round_robin_and_batch_slices_cover_every_item_once():
    shares = [Processes(rank, 3).round_robin(list(range(8))) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    slices = [Processes(rank, 2).slice_of(6) for rank in range(2)]
    assert [list(range(6))[s] for s in slices] == [[0, 1, 2], [3, 4, 5]]
    assert Processes().slice_of(5) == slice(0, 5)


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="batch of 5 cannot be split evenly over 2 processes"):
        Processes(1, 2).slice_of(5)


def test_alone_every_collective_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched() and processes() == Processes(0, 1) and processes().main
    tensor = torch.arange(3.0)
    assert sum_(tensor) is tensor
    assert gather({"a": 1}) == [{"a": 1}]
    finish()  # no group to leave


@pytest.fixture(scope="module")
def heatmap_runs(tiny_dirs, tmp_path_factory):
    """`visedit heatmaps` on the tiny BLIP-2 and 3 world records in chunks of one: alone and as two
    processes."""
    out = tmp_path_factory.mktemp("parallel-heatmaps")
    tiny_world = write_world(out / "world", seed=0, n_train=2, n_eval=3, n_caption_train=1, n_caption_eval=1)
    args = ["-m", "visedit.cli", "heatmaps", "--backbone", "blip2", "--model", str(tiny_dirs["blip2"]),
            "--data", str(tiny_world / "vqa_eval.json"), "--n", "3", "--batch-size", "1"]
    alone = run_alone(*args, "--out", str(out / "alone"), "--no-progress")
    shared = launch(*args, "--out", str(out / "shared"))
    return out, alone, shared


def test_sharded_attribution_writes_the_one_process_artifact(heatmap_runs):
    out, _, shared = heatmap_runs
    assert "(process 1 of 2)" in shared.stderr and "(process 0 of 2)" in shared.stderr  # both did chunks
    alone, merged = load_file(out / "alone" / "attribution.safetensors"), load_file(out / "shared" /
                                                                                     "attribution.safetensors")
    assert alone.keys() == merged.keys()
    for key in alone:
        torch.testing.assert_close(merged[key], alone[key], rtol=0, atol=1e-6, msg=key)
    assert (json.loads((out / "shared" / "attribution.json").read_text())
            == json.loads((out / "alone" / "attribution.json").read_text()))


def test_only_the_main_process_writes_and_reports(heatmap_runs):
    out, alone, shared = heatmap_runs
    assert shared.stdout.count("figures and the artifact in") == 1
    assert sorted(p.name for p in (out / "shared").iterdir()) == sorted(p.name for p in (out / "alone").iterdir())
    assert not (out / "shared" / "work").exists()  # the chunks are removed once the artifact is written
