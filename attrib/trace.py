"""nnsight access to a backbone: wrap once, address modules by the spec's dotted paths.

Usage::

    nm = traced(backbone.model)
    with torch.no_grad(), nm.trace(**inputs):
        hidden = envoy(nm, spec.layer_path(3)).output.save()   # [B, T, D]
        logits = nm.output.logits.save()                       # [B, T, V]
"""
from __future__ import annotations

import warnings
import weakref

import torch
from nnsight import NNsight

_WRAPPED: "weakref.WeakKeyDictionary[torch.nn.Module, NNsight]" = weakref.WeakKeyDictionary()


def traced(model: torch.nn.Module) -> NNsight:
    """The model wrapped for nnsight tracing (weights shared, not copied), wrapped once per model:
    re-wrapping walks every module and cost ~7 ms a call on the small defaults."""
    if model not in _WRAPPED:
        with warnings.catch_warnings():
            # Q-Former layers own submodules named "output"; nnsight renames them and warns each time.
            warnings.filterwarnings("ignore", message=".*has a submodule named 'output'.*")
            _WRAPPED[model] = NNsight(model)
    return _WRAPPED[model]


def envoy(root, path: str):
    """The nnsight envoy at dotted ``path`` (numeric parts index ModuleLists), like get_submodule."""
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node
