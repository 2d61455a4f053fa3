"""Shared fixtures: tiny backbones of every family, built once per test session and loaded back
through `load_backbone`, so tests walk the real loading path."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from PIL import Image

from attrib.backbones.build import BackboneSizes, build_backbone, save_backbone
from attrib.backbones.loader import load_backbone
from attrib.backbones.spec import SPECS
from attrib.backbones.tokenizer import train_bpe_tokenizer

# Fuzzing (hypothesis): derandomised, so a run is reproducible and CI sees the cases a developer saw.
# `make test` uses "default"; HYPOTHESIS_PROFILE=thorough runs 20x the cases (docs/guarantees.md).
_FUZZ = dict(derandomize=True, deadline=None, database=None, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("default", max_examples=100, **_FUZZ)
settings.register_profile("thorough", max_examples=2000, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

BACKBONES = sorted(SPECS)
TINY_CORPUS = [
    "what color is the circle? red", "what shape is the blue object? square",
    "how many objects are there? two", "a photo of a small red circle left of a large blue square",
    "nq question: what is the capital of zorbia? plimton", "is there a green triangle? yes",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_bpe_tokenizer(TINY_CORPUS * 10, vocab_size=320, whole_words=["red", "blue", "yes"])


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_tokenizer) -> dict:
    """Saved tiny model folders, one per backbone name."""
    dirs = {}
    for name in BACKBONES:
        model, processor = build_backbone(name, BackboneSizes(), tiny_tokenizer, seed=0)
        dirs[name] = save_backbone(model, processor, tmp_path_factory.mktemp(f"tiny-{name}"))
    return dirs


@pytest.fixture(scope="session", params=BACKBONES)
def tiny_backbone(request, tiny_dirs):
    """A tiny backbone of each family, loaded from disk through load_backbone."""
    return load_backbone(request.param, tiny_dirs[request.param])


@pytest.fixture(scope="session")
def tiny_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
