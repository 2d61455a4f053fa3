"""`visedit caption-tokens`: the comparison's methods counted on the caption test split, written with the
roles, one method added to an earlier run's file."""
from __future__ import annotations

import json

import pytest

from attrib.world import write_world
from editing.command.caption_tokens import RESULT, run_caption_tokens
from editing.command.compare import CompareOptions
from visedit.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("captok") / "w", seed=0, n_train=2, n_eval=1, n_caption_train=5,
                       n_caption_eval=2)


def test_counts_are_written_per_method_with_the_roles(world, tiny_dirs, tmp_path):
    options = CompareOptions(backbone="blip2", model=tiny_dirs["blip2"], train=world / "caption_train.json",
                             eval=world / "caption_eval.json", dev_n=2, n_dev=2, out=tmp_path, progress=False,
                             methods=("none",))
    results = run_caption_tokens(options)
    none = results["methods"]["none"]
    assert none["n_records"] == 2 and none["rest_right"] == none["rest_right_unedited"]
    assert results["roles"]["test"]["file"].endswith("caption_eval.json") and results["task"] == "caption"
    assert main(["caption-tokens", "--backbone", "blip2", "--model", str(tiny_dirs["blip2"]), "--methods", "lookup",
                 "--train", str(world / "caption_train.json"), "--eval", str(world / "caption_eval.json"),
                 "--dev-n", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    saved = json.loads((tmp_path / RESULT).read_text())
    assert set(saved["methods"]) == {"none", "lookup"} and saved["methods"]["none"] == none
    assert saved["methods"]["lookup"]["n_records"] == 2 and saved["n_test"] == 2
    fewer = run_caption_tokens(CompareOptions(**{**options.__dict__, "n_test": 1, "methods": ("none",)}))
    assert set(fewer["methods"]) == {"none"} and fewer["methods"]["none"]["n_records"] == 1  # not mixed
