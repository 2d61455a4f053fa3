"""Shared by the training tests: the tiny world's training records."""
from __future__ import annotations

import pytest

from attrib.data import load_records


@pytest.fixture(scope="module")
def records(tiny_world):
    return load_records(tiny_world / "vqa_train.json")
