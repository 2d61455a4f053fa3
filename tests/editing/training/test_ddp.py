"""VEAD + IM training as two processes (``accelerate launch``, gloo on the CPU) against one process with the
same global batch: the step-1 gradient and the weights after 3 steps are equal.

One parameter is compared differently: the VEAD key bias. Softmax attention is invariant to a shift shared by
every key, so its true gradient is exactly zero and what autograd returns is rounding noise (~1e-9 here);
Adam divides that noise by its own running size and moves the bias by up to ±lr per step either way, in any
run. Its gradient is checked to be that noise instead.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attrib.world import write_world
from tests.launch import launch, run_alone

SCRIPT = str(Path(__file__).with_name("ddp_run.py"))
ZERO_GRADIENT = "vead.k.bias"


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    world = write_world(tmp_path_factory.mktemp("ddp-world") / "w", seed=0, n_train=8, n_eval=2,
                        n_caption_train=1, n_caption_eval=1)
    return str(world / "vqa_train.json")


@pytest.mark.parametrize(("name", "rows_per_backward"), [("llava", 1), ("blip2", 0)])
def test_two_processes_train_the_weights_of_one(name, rows_per_backward, tiny_dirs, train_file, tmp_path):
    """Global batch 4 (2 records per process), scene gate and target role on, one locality partner;
    products one record at a time (larger product chunks batch each process's own records, which moves
    the influence targets in float rounding, see docs/gpu.md)."""
    args = [name, str(tiny_dirs[name]), train_file]
    run_alone(SCRIPT, *args, str(tmp_path / "one.safetensors"), "3", str(rows_per_backward), "1")
    launch(SCRIPT, *args, str(tmp_path / "two.safetensors"), "3", str(rows_per_backward), "1")
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    grads = [k for k in one if k.startswith("grad.") and k != f"grad.{ZERO_GRADIENT}"]
    largest = max(one[k].abs().max().item() for k in grads)
    for key in grads:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6 * largest, msg=key)
    for key in [k for k in one if k.startswith("weight.") and k != f"weight.{ZERO_GRADIENT}"]:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
    for run in (one, two):
        assert run[f"grad.{ZERO_GRADIENT}"].abs().max().item() < 1e-6 * largest
