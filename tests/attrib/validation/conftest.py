"""Fixtures of the validation tests: a small world on disk and two of its scored samples."""
from __future__ import annotations

import pytest

from attrib.data import load_records
from attrib.prompts import load_prompts
from attrib.world import write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("w") / "world", seed=3, n_train=2, n_eval=6, n_caption_train=1,
                       n_caption_eval=1)


@pytest.fixture(scope="module")
def samples(world):
    records = [r for r in load_records(world / "vqa_eval.json") if r.box("image") is not None][:2]
    return records, [r.load_image() for r in records], [load_prompts()["vqa"].format(src=r.src) for r in records]
