"""Shared by the training tests: the tiny LLaVA backbone and the tiny world's training records."""
from __future__ import annotations

import pytest

from attrib.backbones.loader import load_backbone
from attrib.data import load_records


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    return load_backbone("llava", tiny_dirs["llava"])


@pytest.fixture(scope="module")
def records(tiny_world):
    return load_records(tiny_world / "vqa_train.json")
