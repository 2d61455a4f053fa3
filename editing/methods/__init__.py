"""Every editing method the comparison runs, behind the one `editing.editor.Editor` interface.

    editor = build_method("ft_l", MethodContext(backbone, task="vqa", seed=0))
    editor.prepare(train_records, dev_records)     # learned methods train here; the rest do nothing
    editor.edit(EditRequest.from_record(record)); ...; editor.restore()

A method is a module of this package with ``build(context) -> Editor``; its hyperparameters live in
``editing/methods/config/<name>.yaml``: a ``default`` mapping, and one per backbone name whose keys
override it. `MethodContext.hyper` holds the merged table, so every run records the values it used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attrib.backbones.loader import Backbone
from editing.editor import Editor

CONFIG_DIR = Path(__file__).parent / "config"

# name → module under editing.methods; the order is the order of the comparison's table.
METHODS: dict[str, str] = {
    "none": "none",
    "visedit": "visedit",
    "visedit_gated": "visedit",
    "ft_l": "finetune",
    "ft_v": "finetune",
    "tp": "patcher",
    "ike": "ike",
    "mend": "mend",
    "serac": "serac",
    "grace": "grace",
    "lookup": "lookup",
}


@dataclass
class MethodContext:
    """What a method is built from.

    task: "vqa" or "caption" (which prompt format wraps the edit); seed: every random draw of the method
    comes from it; hyper: the method's merged config (`method_config`, filled in by `build_method`
    when empty); work: a folder for the method's own files (checkpoints, curves), None for none;
    extra: what the comparison hands a method beyond the backbone (e.g. VisEdit's placement).
    """

    backbone: Backbone
    task: str = "vqa"
    seed: int = 0
    name: str = ""
    hyper: dict[str, Any] = field(default_factory=dict)
    work: Path | None = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def method_config(name: str, backbone: str) -> dict[str, Any]:
    """The ``default`` mapping of ``config/<name>.yaml`` updated by the backbone's (module docstring); {}
    when the method has no config file."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        return {}
    tables = yaml.safe_load(path.read_text()) or {}
    unknown = set(tables) - {"default", "llava", "blip2", "minigpt4"}
    if not isinstance(tables, dict) or unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; use default, llava, blip2, minigpt4")
    return {**tables.get("default", {}), **tables.get(backbone, {})}


def build_method(name: str, context: MethodContext) -> Editor:
    """The editor of method ``name`` on ``context.backbone`` (hyperparameters from its config file unless
    ``context.hyper`` is given)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    context.name = name
    if not context.hyper:
        context.hyper = method_config(name, context.backbone.spec.name)
    module = importlib.import_module(f"editing.methods.{METHODS[name]}")
    return module.build(context)
