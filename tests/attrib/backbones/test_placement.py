"""--device / --dtype: what each resolves to, and one-line refusals for what this machine lacks."""
from __future__ import annotations

import pytest
import torch

from attrib.backbones.placement import resolve_placement
from visedit.cli import main

NO_GPU = not torch.cuda.is_available()


def test_auto_is_float32_on_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement() == (torch.float32, None)
    assert resolve_placement("cpu", "bfloat16") == (torch.bfloat16, None)


def test_auto_is_bf16_on_the_gpu_when_one_is_visible(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_placement() == (torch.bfloat16, {"": "cuda"})
    assert resolve_placement("cuda:1", "float16") == (torch.float16, {"": "cuda:1"})
    assert resolve_placement("balanced") == (torch.bfloat16, "auto")


def test_balanced_is_refused_under_a_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="cannot run under `accelerate launch`"):
        resolve_placement("balanced")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize(("device", "dtype", "message"), [
    ("cuda", "auto", "--device cuda: no GPU is visible"),
    ("balanced", "auto", "--device balanced needs visible GPUs"),
    ("gpu0", "auto", "--device 'gpu0': not a device"),
    ("cpu", "float8", "--dtype 'float8': choose from auto, float32, bfloat16, float16"),
])
def test_what_the_machine_lacks_is_one_line(device, dtype, message, tiny_dirs, capsys):
    assert main(["heatmaps", "--backbone", "llava", "--model", str(tiny_dirs["llava"]), "--device", device,
                 "--dtype", dtype, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
