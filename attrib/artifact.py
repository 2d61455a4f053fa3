"""Reading back what the toolkit wrote, checked before anything uses it.

- `load_artifact`: an attribution artifact (``attribution.json`` + ``attribution.safetensors``, written by
  `attrib.attribution.Attribution.save`) as an `AttributionArtifact`, the two files checked against each
  other: every tensor there, none extra, shapes that agree with ``n_samples``, the layer count and the
  region grid and layers the JSON states, finite values, and the JSON's mean contributions equal to the
  means of the stored tensors (a JSON paired with another run's tensors is caught).
- `check_placement`: a ``placement`` object (edit layer, influence-target layers, IM read layer); the
  editor reads it alone (`editing.adapter.visedit.EditPlacement.from_artifact`).
- `safetensors_metadata`: the metadata of a safetensors file, from its header alone; `parse_json` for
  the JSON text such metadata holds.
- `check_state_dict`: tensors read from a file against the module they are about to be loaded into
  (names, shapes, kinds, finite values), so a wrong file fails before anything is copied.
- `optimizer_tensors` / `optimizer_state`: an optimizer's state as safetensors tensors plus JSON param
  groups, and back, checked against the optimizer (training checkpoints; no pickle).
- `rng_text` / `rng_state`: the global torch RNG state as base64 text, and back, checked.

Every failed check raises `ArtifactError` with one line naming the file and the field or tensor.

    artifact = load_artifact("figures/llava")            # the folder, or either of its two files
    artifact.contribution.plot_bars()                    # a ContributionResult again: [N, L] tensors
    artifact.regions[artifact.primary]                   # [N, len(artifact.layers), rows × cols]
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attrib.attribution import ARTIFACT_JSON, ARTIFACT_TENSORS
from attrib.contribution import ContributionResult
from attrib.errors import ArtifactError
from attrib.io import read_json, read_safetensors, require

PER_LAYER = ("attn", "mlp", "dla_attn", "dla_mlp")  # [N, L]
PER_SAMPLE = ("dla_embed", "dla_bias", "logit")  # [N]


@dataclass(frozen=True)
class AttributionArtifact:
    """A checked attribution artifact. N samples, L decoder layers, C = rows × cols regions."""

    path: Path  # attribution.json
    data: dict  # the JSON as written
    contribution: ContributionResult  # per-sample contributions: [N, L] and [N] tensors
    regions: dict[str, torch.Tensor]  # method → maps [n ≤ N, layers, C']; the primary's are [N, len(layers), C]
    primary: str  # the method the JSON's ``regions`` summarises

    @property
    def backbone(self) -> str:
        return self.data["backbone"]

    @property
    def fingerprint(self) -> str:
        return self.data["model"]["fingerprint"]

    @property
    def n_samples(self) -> int:
        return self.data["n_samples"]

    @property
    def n_layers(self) -> int:
        return self.contribution.n_layers

    @property
    def grid(self) -> tuple[int, int]:
        rows, cols = self.data["regions"]["grid"]
        return rows, cols

    @property
    def layers(self) -> list[int]:
        """The LM layers of the primary maps' second axis."""
        return self.data["regions"]["layers"]

    @property
    def placement(self) -> dict:
        return check_placement(self.data["placement"], f"{self.path}, in 'placement'", self.n_layers)


def artifact_paths(folder_or_file: str | Path) -> tuple[Path, Path]:
    """(attribution.json, attribution.safetensors) from the artifact's folder or either of its files."""
    path = Path(folder_or_file)
    if path.is_dir():
        return path / ARTIFACT_JSON, path / ARTIFACT_TENSORS
    if path.suffix == ".safetensors":
        return path.with_name(ARTIFACT_JSON), path
    return path, path.with_name(ARTIFACT_TENSORS)


def load_artifact(folder_or_json: str | Path) -> AttributionArtifact:
    """The artifact in a folder (or named by its ``attribution.json``), checked as the module docstring
    says; `ArtifactError` names the file and the field or tensor that is wrong."""
    json_path, tensors_path = artifact_paths(folder_or_json)
    data = read_json(json_path, "VisEdit attribution artifact")
    n, n_layers, methods = _check_json(data, json_path)
    tensors, _ = read_safetensors(tensors_path, "attribution tensor file")
    expected = {f"contribution.{name}" for name in ("key_tokens", *PER_LAYER, *PER_SAMPLE)}
    expected |= {f"regions.{name}" for name in methods}
    _check_names(set(tensors), expected, tensors_path, f"the tensors {json_path.name} states")
    contribution = {name: tensors[f"contribution.{name}"] for name in ("key_tokens", *PER_LAYER, *PER_SAMPLE)}
    _check_contribution(contribution, n, n_layers, tensors_path)
    _check_means(data, contribution, json_path)
    regions = {name: tensors[f"regions.{name}"] for name in methods}
    primary = methods[0]
    rows, cols = data["regions"]["grid"]
    for name, maps in regions.items():
        shape = (n, len(data["regions"]["layers"]), rows * cols) if name == primary else None
        _check_maps(maps, f"{tensors_path}: tensor 'regions.{name}'", n, n_layers, shape)
    result = ContributionResult(data["backbone"], data["model"]["fingerprint"], **contribution)
    return AttributionArtifact(json_path, data, result, regions, primary)


# ------------------------------------------------------------------------------------------------- JSON

def _field(data: Any, dotted: str, kind: type | tuple[type, ...], path: Path, default: Any = ...) -> Any:
    """``data[a][b]`` for ``dotted`` "a.b" (every level above the last an object), of type ``kind``."""
    parts = dotted.split(".")
    node = data
    for depth, key in enumerate(parts):
        last = depth == len(parts) - 1
        where = str(path) if depth == 0 else f"{path}, in {'.'.join(parts[:depth])!r}"
        node = require(node, key, kind if last else dict, where, ArtifactError, default if last else ...)
    return node


def _numbers(values: list, where: str, length: int | None = None) -> list[float]:
    """``values`` checked to be finite numbers (``length`` of them when given)."""
    if length is not None and len(values) != length:
        raise ArtifactError(f"{where}: {len(values)} values, expected {length}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ArtifactError(f"{where}: item {i} is {value!r}, expected a finite number")
    return values


def _ints(values: list, where: str, low: int, high: int | None) -> list[int]:
    """``values`` checked to be whole numbers in ``low`` .. ``high`` (no upper bound when None)."""
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArtifactError(f"{where}: item {i} is {value!r}, expected a whole number")
        if value < low or (high is not None and value > high):
            raise ArtifactError(f"{where}: item {i} is {value}, outside {low}..{'' if high is None else high}")
    return values


def check_placement(placement: Any, where: str, n_layers: int | None = None) -> dict:
    """A placement object ``{"edit_layer", "it_layers", "im_read_layer"?, "ceiling"?}`` checked, with its
    layers in range when ``n_layers`` is known (-1 = the LM's input); ``where`` names the file and object.
    Returns the four fields (absent optional ones as None)."""
    top = None if n_layers is None else n_layers - 1
    edit = require(placement, "edit_layer", int, where)
    _ints([edit], f"{where}, field 'edit_layer'", -1, top)
    it_layers = _ints(require(placement, "it_layers", list, where), f"{where}, field 'it_layers'", 0, top)
    read = require(placement, "im_read_layer", (int, type(None)), where, default=None)
    if read is not None:
        _ints([read], f"{where}, field 'im_read_layer'", -1, top)
    ceiling = require(placement, "ceiling", (list, type(None)), where, default=None)
    if ceiling is not None:
        _numbers(ceiling, f"{where}, field 'ceiling'", None if n_layers is None else n_layers + 1)
    return {"edit_layer": edit, "it_layers": it_layers, "im_read_layer": read, "ceiling": ceiling}


def _check_json(data: Any, path: Path) -> tuple[int, int, list[str]]:
    """(N, L, region methods with the primary first) of an artifact's JSON, every field used checked."""
    _field(data, "backbone", str, path)
    _field(data, "model.fingerprint", str, path)
    _field(data, "model.path", (str, type(None)), path, default=None)
    n = _field(data, "n_samples", int, path)
    if n < 1:
        raise ArtifactError(f"{path}, field 'n_samples': {n}; expected at least 1")
    attn = _numbers(_field(data, "contribution.attn", list, path), f"{path}, field 'contribution.attn'")
    if not attn:
        raise ArtifactError(f"{path}, field 'contribution.attn': empty; expected one value per layer")
    n_layers = len(attn)
    _numbers(_field(data, "contribution.mlp", list, path), f"{path}, field 'contribution.mlp'", n_layers)
    grid = _ints(_field(data, "regions.grid", list, path), f"{path}, field 'regions.grid'", 1, None)
    if len(grid) != 2:
        raise ArtifactError(f"{path}, field 'regions.grid': {grid}; expected [rows, cols]")
    layers = _ints(_field(data, "regions.layers", list, path), f"{path}, field 'regions.layers'", -1, n_layers - 1)
    if not layers:
        raise ArtifactError(f"{path}, field 'regions.layers': empty; expected the layers of the primary maps")
    method = _field(data, "regions.method", str, path)
    check_placement(_field(data, "placement", dict, path), f"{path}, in 'placement'", n_layers)
    methods = list(_field(data, "details.methods", dict, path))
    if method not in methods:
        raise ArtifactError(f"{path}, field 'regions.method': {method!r} is not among details.methods "
                            f"({', '.join(methods) or 'none'})")
    methods.remove(method)
    return n, n_layers, [method, *methods]


# ---------------------------------------------------------------------------------------------- tensors

def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_names(found: set[str], expected: set[str], path: Path | str, what: str, hint: str = "") -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(extra)}"] if extra else [])
    if parts:
        raise ArtifactError(f"{path}: does not hold {what} ({'; '.join(parts)}){hint}")


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def safetensors_metadata(path: str | Path, what: str = "safetensors file") -> dict[str, str]:
    """The metadata of a safetensors file from its header alone (no tensor read); a missing, truncated or
    corrupt file raises `ArtifactError` naming it (``what``: what it should be)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found; expected a {what}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ArtifactError(f"{path}: not a readable {what} ({detail})") from None


def parse_json(text: Any, where: str) -> Any:
    """JSON text kept inside another file (safetensors metadata, say), parsed; ``where`` names the file
    and the entry for the `ArtifactError` that malformed, missing or too deeply nested text raises."""
    if not isinstance(text, str):
        raise ArtifactError(f"{where}: missing; expected JSON text")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{where} is not JSON ({error.msg} at column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # a number too long to read, nesting too deep
        raise ArtifactError(f"{where} is not JSON that can be read ({type(error).__name__})") from None


def _check_finite(tensor: torch.Tensor, where: str) -> None:
    if not tensor.is_floating_point():
        return
    values = tensor.float() if tensor.element_size() == 1 else tensor  # torch has no isfinite for some fp8 kinds
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ArtifactError(f"{where}: {bad} of {tensor.numel()} values are NaN or infinite")


def _check_contribution(tensors: dict[str, torch.Tensor], n: int, n_layers: int, path: Path) -> None:
    for name, tensor in tensors.items():
        where = f"{path}: tensor 'contribution.{name}'"
        want = [n, n_layers] if name in PER_LAYER else [n]
        if _shape(tensor) != want:
            raise ArtifactError(f"{where} has shape {_shape(tensor)}; the JSON states {want} "
                                f"({'n_samples × layers' if name in PER_LAYER else 'n_samples'})")
        if name == "key_tokens":
            if tensor.is_floating_point() or tensor.dtype == torch.bool or bool((tensor < 0).any()):
                raise ArtifactError(f"{where}: expected token ids (non-negative integers), found {tensor.dtype}")
        elif not tensor.is_floating_point():
            raise ArtifactError(f"{where}: expected floating point values, found {tensor.dtype}")
        _check_finite(tensor, where)


def _check_means(data: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The JSON's mean curves must be the stored tensors' means (else the two files are from two runs)."""
    for name in ("attn", "mlp"):
        stated = torch.tensor(data["contribution"][name], dtype=torch.float64)
        stored = tensors[name].double().mean(0)
        if not torch.allclose(stated, stored, rtol=1e-4, atol=1e-6):
            layer = int((stated - stored).abs().argmax())
            raise ArtifactError(f"{path}, field 'contribution.{name}': layer {layer} states "
                                f"{stated[layer].item():.6g}, the stored tensor's mean is {stored[layer].item():.6g}; "
                                f"the JSON and the tensors come from different runs")


def _check_maps(maps: torch.Tensor, where: str, n: int, n_layers: int, shape: tuple[int, int, int] | None) -> None:
    """Region maps [n, layers, C]: the exact ``shape`` for the primary method, else n ≤ N, layers ≤ L."""
    if not maps.is_floating_point():
        raise ArtifactError(f"{where}: expected floating point maps, found {maps.dtype}")
    if shape is not None and tuple(maps.shape) != shape:
        raise ArtifactError(f"{where} has shape {_shape(maps)}; the JSON states {list(shape)} "
                            f"(n_samples × regions.layers × regions.grid cells)")
    if maps.dim() != 3 or not (1 <= maps.shape[0] <= n and 1 <= maps.shape[1] <= n_layers and maps.shape[2] >= 1):
        raise ArtifactError(f"{where} has shape {_shape(maps)}; expected [samples ≤ {n}, layers ≤ {n_layers}, "
                            f"regions ≥ 1]")
    _check_finite(maps, where)


def check_state_dict(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str | Path,
                     what: str, free: dict[str, tuple[int | None, ...]] | None = None, hint: str = "") -> None:
    """``found`` (read from ``source``) must hold exactly the tensors of ``expected`` (a module's
    ``state_dict()``), each of its shape, both floating point or both not, and finite. ``free``: tensors
    whose size comes from the file, by shape pattern (None = any size; an empty tensor always fits).
    ``hint`` is appended to the message (e.g. what to do about it)."""
    free = free or {}
    _check_names(set(found), set(expected), source, what, hint)
    for name, tensor in found.items():
        want = expected[name]
        where = f"{source}: tensor {name!r}"
        pattern = free.get(name)
        if pattern is not None:
            fits = tensor.numel() == 0 and tensor.dim() == len(pattern) or (
                tensor.dim() == len(pattern) and all(p is None or p == s for p, s in zip(pattern, tensor.shape)))
            shown = "[" + ", ".join("*" if p is None else str(p) for p in pattern) + "]"
        else:
            fits, shown = tensor.shape == want.shape, str(_shape(want))
        if not fits:
            raise ArtifactError(f"{where} has shape {_shape(tensor)}, {what} need {shown}{hint}")
        if tensor.is_floating_point() != want.is_floating_point():
            raise ArtifactError(f"{where} is {tensor.dtype}, {what} need {want.dtype}{hint}")
        _check_finite(tensor, where)


# ------------------------------------------------------------------------------------ optimizer and RNG

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(tensors ``"<param index>.<slot>"``, JSON-ready param groups) of an optimizer's state."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, slots in state["state"].items() for name, value in slots.items()
               if isinstance(value, torch.Tensor)}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}  # betas: JSON list
              for group in state["param_groups"]]
    return tensors, groups


def _group_value(value: Any, own: Any, where: str) -> Any:
    """A saved hyperparameter checked against the optimizer's own value of it (same kind, finite)."""
    if isinstance(own, bool) or own is None:
        ok = value is None or isinstance(value, bool)
    elif isinstance(own, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(own, (tuple, list)):
        ok = isinstance(value, list) and len(value) == len(own)
        if ok:
            _numbers(value, where)
    else:
        ok = isinstance(value, type(own))
    if not ok:
        raise ArtifactError(f"{where}: {value!r} does not fit the optimizer's {own!r}")
    return value


def optimizer_state(tensors: dict[str, torch.Tensor], groups: Any, optimizer: torch.optim.Optimizer,
                    source: str | Path, where: str) -> dict:
    """The state dict to give ``optimizer.load_state_dict``, from `optimizer_tensors`' two parts, checked
    against ``optimizer``: the same param groups, slots of known parameters with their shapes, finite
    values. ``source`` names the tensor file, ``where`` the JSON holding ``groups``."""
    own = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(own):
        found = f"{len(groups)} param groups" if isinstance(groups, list) else type(groups).__name__
        raise ArtifactError(f"{where}, field 'param_groups': {found}; the optimizer has {len(own)}")
    checked = []
    for i, (group, mine) in enumerate(zip(groups, own)):
        at = f"{where}, param group {i}"
        if require(group, "params", list, at) != mine["params"]:
            raise ArtifactError(f"{at}, field 'params': {group['params']!r} is not the optimizer's {mine['params']!r}")
        values = {key: _group_value(group[key], value, f"{at}, field {key!r}") if key in group else value
                  for key, value in mine.items() if key != "params"}
        checked.append({**values, "params": mine["params"]})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= len(params) or not name:
            raise ArtifactError(f"{source}: tensor {key!r} is not '<parameter index>.<slot>' of the optimizer's "
                                f"{len(params)} parameters")
        param = params[int(index)]
        want = [] if name == "step" else _shape(param)
        if _shape(value) != want and not (name == "step" and value.numel() == 1):
            raise ArtifactError(f"{source}: tensor {key!r} has shape {_shape(value)}; parameter {index} needs {want}")
        _check_finite(value, f"{source}: tensor {key!r}")
        slots.setdefault(int(index), {})[name] = value if name == "step" else value.to(param.device, param.dtype)
    kinds = {frozenset(s) for s in slots.values()}
    if len(kinds) > 1:
        raise ArtifactError(f"{source}: parameters hold different optimizer slots ({sorted(map(sorted, kinds))})")
    return {"state": slots, "param_groups": checked}


def rng_text() -> str:
    """The global torch RNG state as base64 text (JSON-ready)."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def rng_state(text: Any, where: str) -> torch.Tensor:
    """The torch RNG state `rng_text` wrote, checked (base64, the size of this torch's state)."""
    size = torch.get_rng_state().numel()
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or len(raw) != size:
        found = "not base64 text" if raw is None else f"{len(raw)} bytes"
        raise ArtifactError(f"{where}: not a torch RNG state ({found}; expected {size} bytes in base64)")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
