"""The shipped default models: one small VLLM per backbone, trained on the synthetic world.

``attrib/defaults/models/<backbone>`` is a plain Hugging Face folder (config, safetensors weights,
tokenizer, processor, ``manifest.json`` with the recipe, wall time and held-out accuracies) that
`load_backbone` reads like any real checkpoint. Every command loads it when no model folder is given
(`load_model`). `attrib.defaults.recipe` holds how they are trained, `attrib.defaults.train` trains them.
"""
from __future__ import annotations

from pathlib import Path

from attrib.backbones.loader import Backbone, load_backbone
from attrib.backbones.spec import get_spec
from attrib.data import DataError

DEFAULTS_DIR = Path(__file__).parent / "models"


def default_model(backbone: str) -> Path:
    """The shipped folder a backbone's commands load when no model is given."""
    return DEFAULTS_DIR / backbone


def load_model(backbone: str, model: str | Path | None = None, device: str = "auto", dtype: str = "auto"
               ) -> Backbone:
    """The ``backbone`` at the local folder ``model``, or its shipped default — what every command loads. An
    unknown backbone name lists the choices; a default not built yet says how to build it. ``device`` and
    ``dtype``: `attrib.backbones.placement.resolve_placement` (default: the GPU in bf16 when there is one,
    else the CPU in float32)."""
    from attrib.backbones.placement import resolve_placement

    get_spec(backbone)  # before any folder is looked for
    path = default_model(backbone) if model is None else Path(model)
    if model is None and not (path / "config.json").is_file():
        raise DataError(f"{path}: the default {backbone} model is not there; run `make toy-models "
                        f"OUT=attrib/defaults/models` or pass MODEL=")
    torch_dtype, device_map = resolve_placement(device, dtype)
    return load_backbone(backbone, path, dtype=torch_dtype, device_map=device_map)
