"""VisEdit's editor: ``edit(request)`` stores an edit signal, ``restore()`` clears them; no weight changes.

    backbone = load_backbone("llava", path)
    placement = EditPlacement.from_artifact("figures/llava/attribution.json", backbone)
    editor = VisEditEditor(backbone, placement, VeadConfig(), weights="runs/llava/adapter.safetensors")
    editor.edit(EditRequest(image, "What color is the square? The answer is:", "green"))
    logits = backbone.forward(backbone.encode([image], [prompt])).logits   # edited
    editor.restore()                                                       # bit-identical to unedited

Applying an edit is one forward of the edit sample ``template(prompt) + " " + target`` (adapter closed)
that stops after the deepest layer it needs: the edit layer (all tokens, for VEAD's keys and values) and
the IM read layer (the last prompt token, for the IM). ``im_read_layer`` defaults to the edit layer, as
in the official code; at ``edit_layer = -1`` the last prompt token is a bare word embedding that has not
seen the image or the question, so a trainer placing the adapter at the LM's input should read the IM's
query deeper (e.g. the first influence-target layer) — it is a field of `EditPlacement`, saved with
the weights.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from safetensors.torch import save_file

from attrib.artifact import artifact_paths, check_placement, check_state_dict, parse_json, safetensors_metadata
from attrib.backbones.loader import Backbone
from attrib.backbones.partial import StopForward, forward_until_stopped
from attrib.errors import ArtifactError
from attrib.io import atomic_write, read_json, read_safetensors, require
from editing.adapter.hook import LM_INPUT, AdapterHook
from editing.adapter.output_write import OutputWrite, OutputWriteConfig, fit_output_write, histories
from editing.adapter.question_gate import prompt_ids
from editing.adapter.vead import EditAdapter, EditSignal, VeadConfig, lm_width
from editing.editor import Editor, EditRequest
from editing.inputs import teacher_forced_batch

WEIGHTS_FORMAT = "visedit-adapter/1"


@dataclass(frozen=True)
class EditPlacement:
    """Where the adapter goes. edit_layer: decoder layer whose output is rewritten (−1 = LM input);
    it_layers: influence-target layers (the trainer's IM alignment targets); im_read_layer: layer
    whose last-prompt-token state of the edit sample feeds the IM (None = edit_layer)."""

    edit_layer: int
    it_layers: tuple[int, ...] = ()
    im_read_layer: int | None = None

    def __post_init__(self):
        if self.im_read_layer is None:  # normalised, so equal placements compare equal
            object.__setattr__(self, "im_read_layer", self.edit_layer)
        object.__setattr__(self, "it_layers", tuple(self.it_layers))

    @property
    def read_layer(self) -> int:
        return self.im_read_layer

    def check(self, n_layers: int) -> None:
        for name, value in (("edit_layer", self.edit_layer), ("im_read_layer", self.read_layer)):
            if not LM_INPUT <= value < n_layers:
                raise ValueError(f"placement {name}={value} is outside -1..{n_layers - 1} (-1 = the LM's input)")

    def to_json(self) -> dict:
        return {"edit_layer": self.edit_layer, "it_layers": list(self.it_layers), "im_read_layer": self.read_layer}

    @classmethod
    def coerce(cls, placement: Any) -> "EditPlacement":
        """From an EditPlacement, an `attrib.placement.Placement`, a dict (artifact ``placement``) or an int."""
        if isinstance(placement, cls):
            return placement
        if isinstance(placement, int):
            return cls(placement)
        if isinstance(placement, dict):
            return cls(int(placement["edit_layer"]), tuple(placement.get("it_layers", ())),
                       placement.get("im_read_layer"))
        return cls(int(placement.edit_layer), tuple(placement.it_layers), getattr(placement, "im_read_layer", None))

    @classmethod
    def from_artifact(cls, path: str | Path, backbone: Backbone, im_read_layer: int | None = None) -> "EditPlacement":
        """The placement of an attribution artifact (``attribution.json`` or its folder), refused when it
        was made for another backbone or another model (fingerprint), saying which, or when its layers do
        not fit this backbone (`ArtifactError`). ``im_read_layer``: the artifact's own when not given (the
        edit layer when it has none)."""
        path, _ = artifact_paths(path)
        data = read_json(path, "VisEdit attribution artifact")
        theirs = require(data, "backbone", str, str(path))
        if theirs != backbone.spec.name:
            raise ArtifactError(f"{path}: attribution was made for backbone {theirs!r}, not {backbone.spec.name!r}")
        model = require(data, "model", dict, str(path))
        theirs, ours = require(model, "fingerprint", str, f"{path}, in 'model'"), backbone.fingerprint()
        if theirs != ours:
            raise ArtifactError(f"{path}: attribution was made for model fingerprint {theirs!r} "
                                f"({model.get('path')}), this model is {ours!r} ({backbone.path})")
        placement = check_placement(require(data, "placement", dict, str(path)), f"{path}, in 'placement'",
                                    backbone.n_layers)
        read = placement["im_read_layer"] if im_read_layer is None else im_read_layer
        return cls(placement["edit_layer"], tuple(placement["it_layers"]), read)


class VisEditEditor(Editor):
    """VEAD + IM installed in ``backbone`` at ``placement``; ``edit`` / ``restore`` switch edits.

    config: adapter sizes (None = read from ``weights``' metadata, else defaults); weights: a
    safetensors file written by `save_weights` or a state dict; output_write: also fit and apply an
    output write per edit (`editing.adapter.output_write`; None = the adapter alone).
    """

    def __init__(self, backbone: Backbone, placement: Any, config: VeadConfig | None = None,
                 weights: str | Path | dict[str, torch.Tensor] | None = None,
                 output_write: OutputWriteConfig | None = None):
        self.backbone = backbone
        self.placement = EditPlacement.coerce(placement)
        self.placement.check(backbone.n_layers)
        if config is None:
            config = weights_config(weights) if isinstance(weights, (str, Path)) else VeadConfig()
        layer = backbone.module(backbone.spec.layer_path(max(self.placement.edit_layer, 0)))
        device = next(layer.parameters()).device
        self.adapter = EditAdapter(lm_width(backbone.config), config).to(device)
        if weights is not None:
            self.load_weights(weights)
        self.hook = AdapterHook(backbone.model, backbone.spec, self.adapter, self.placement.edit_layer)
        self.hook.write_config = output_write
        self.write_fits = {"fitted": 0, "short_of_margin": 0}  # output writes fitted since construction

    @property
    def config(self) -> VeadConfig:
        return self.adapter.config

    lifelong = True

    @property
    def is_edited(self) -> bool:
        return self.hook.active

    def edit(self, request: EditRequest | Sequence[EditRequest]) -> EditSignal:
        """Add the edit of ``request`` to the edits held (`editing.adapter.bank`: every input is routed to
        the stored edit that concerns it), with the adapter's edit-side projections cached for the
        forwards that follow. A sequence of requests instead sets one edit per input row (batched
        training and benchmarks: row r of every input batch gets edit r), replacing the bank's routing.
        With an output write configured, a single request's write is fitted after its signal is stored; with a
        question gate, its question key is stored too."""
        signal = self.adapter.prepare(self.edit_signal(request))
        if isinstance(request, EditRequest):
            index = self.hook.bank.add(signal)
            if self.hook.write_config is not None:
                write = self.output_write(request, signal)
                self.hook.bank.writes.set(index, write)
                self.write_fits["fitted"] += 1
                self.write_fits["short_of_margin"] += not write.reached
            if self.hook.question_gate is not None:
                self.hook.bank.set_question(index, self.question_key(request.prompt))
        else:
            self.hook.signal = signal
        return signal

    @torch.no_grad()
    def output_write(self, request: EditRequest, signal: EditSignal) -> OutputWrite:
        """The output write of ``request`` (`fit_output_write`): the LM head's input at the positions that
        predict its target tokens, from one forward of the edit sample under its own edit ``signal`` alone
        (what the bank gives the edit's own image; with ``fit_on`` "unedited", the adapter shut) and no
        writes; the bank is not consulted, so the cost of an edit does not grow with the edits already held."""
        backbone = self.backbone
        batch = teacher_forced_batch(backbone, [request.image], [request.prompt], [request.target])
        head = backbone.module(backbone.spec.lm_head)
        captured: dict[str, torch.Tensor] = {}
        handle = head.register_forward_pre_hook(lambda module, args: captured.__setitem__("h", args[0].detach()))
        held, self.hook.signal = self.hook.signal, signal
        shut = self.hook.closed() if self.hook.write_config.fit_on == "unedited" else nullcontext()
        try:
            with self.hook.writes_suspended(), shut:
                backbone.forward(batch.inputs, use_cache=False)
        finally:
            self.hook.signal = held
            handle.remove()
        end, n = int(batch.prompt_ends[0]), batch.target_lengths[0]
        ids = batch.inputs["input_ids"][0].to(captured["h"].device)
        config = self.hook.write_config
        history = histories(ids, end, n, config.context) if config.context else None
        return fit_output_write(captured["h"][0, end:end + n], ids[end + 1:end + 1 + n], ids[end:end + n],
                                head.weight, getattr(head, "bias", None), config, history)

    def edit_report(self) -> dict:
        """How many output writes were fitted, and how many ran out of steps short of their margin (a
        write short of it may miss a rephrase: docs/experiments/editing-compare.md)."""
        return {"output_write": dict(self.write_fits)} if self.hook.write_config is not None else {}

    @torch.no_grad()
    def question_key(self, prompt: str) -> torch.Tensor:
        """[dim] the question gate's key of ``prompt`` (`editing.adapter.question_gate`)."""
        gate = self.hook.question_gate
        return gate.keys(prompt_ids(self.backbone, prompt)[None], self.hook.embed)[0]

    def restore(self) -> None:
        """Back to the unedited model (the hook bypasses without edits)."""
        self.hook.signal = None
        self.hook.bank.clear()
        self.hook.last_gate_logits = None
        self.hook.last_scene_logits = None

    def remove(self) -> None:
        """Take the hooks out of the model for good."""
        self.restore()
        self.hook.remove()

    @torch.no_grad()
    def edit_signal(self, request: EditRequest | Sequence[EditRequest]) -> EditSignal:
        """The signal of ``request``(s) from the frozen model, without storing it (trainers cache these)."""
        requests = [request] if isinstance(request, EditRequest) else list(request)
        batch = teacher_forced_batch(self.backbone, [r.image for r in requests], [r.prompt for r in requests],
                                     [r.target for r in requests])
        edit_layer, read_layer = self.placement.edit_layer, self.placement.read_layer
        captured = self._capture(batch.inputs, sorted({edit_layer, read_layer}))
        prompt_end = batch.prompt_ends.to(captured[read_layer].device)
        rows = torch.arange(len(requests), device=prompt_end.device)
        visual = self.backbone.visual_positions(batch.inputs["input_ids"]).to(prompt_end.device)
        return EditSignal(captured[edit_layer], batch.inputs["attention_mask"].bool().to(prompt_end.device),
                          captured[read_layer][rows, prompt_end], prompt_end, visual=visual)

    def _capture(self, inputs, layers: list[int]) -> dict[int, torch.Tensor]:
        """Hidden states [B, T, d] at each of ``layers`` (−1 = input of layer 0), stopping after the last."""
        captured: dict[int, torch.Tensor] = {}
        deepest = layers[-1]

        def keep(layer: int, hidden: torch.Tensor) -> None:
            captured[layer] = hidden.detach()
            if layer == deepest:
                raise StopForward

        spec = self.backbone.spec
        handles = []
        for layer in layers:
            if layer == LM_INPUT:
                module = self.backbone.module(spec.layer_path(0))
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, i=layer: keep(i, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
            else:
                module = self.backbone.module(spec.layer_path(layer))
                handles.append(module.register_forward_hook(
                    lambda m, args, out, i=layer: keep(i, out[0] if isinstance(out, tuple) else out)))
        forward_until_stopped(self.backbone, inputs, handles, self.hook.closed(), use_cache=False)
        return captured

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image] | None, prompts: Sequence[str],
                 max_new_tokens: int = 8) -> list[str]:
        """Greedy answers under the current edit. Visual positions are passed explicitly, because
        BLIP-2's ``generate`` runs ``language_model.generate`` without calling the root model."""
        backbone = self.backbone
        inputs = backbone.encode(images, prompts)
        positions = backbone.visual_positions(inputs["input_ids"]) if images is not None else None
        generator = backbone.model if images is not None else backbone.module(backbone.spec.text_lm)
        with self.hook.visual_positions(positions):
            out = generator.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=backbone.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in backbone.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # -- weights -----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {"format": WEIGHTS_FORMAT, "config": json.dumps(self.config.to_json()),
                "width": str(self.adapter.width), "backbone": self.backbone.spec.name,
                "fingerprint": self.backbone.fingerprint(), "placement": json.dumps(self.placement.to_json())}

    def save_weights(self, path: str | Path) -> Path:
        """Write the adapter's weights and metadata (config, width, backbone, placement) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.adapter.state_dict().items()}
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=self.metadata()))

    def load_weights(self, weights: str | Path | dict[str, torch.Tensor]) -> None:
        """Load adapter weights; a file made for another width, config, backbone, edit layer or IM read
        layer is refused, naming each difference (the model fingerprint is recorded, not enforced: an
        fp16 copy of the same model has another one), and so are unreadable files and tensors that are
        missing, extra, misshapen or not finite (`ArtifactError`, before any weight is copied)."""
        source: str | Path = "adapter state dict"
        if isinstance(weights, (str, Path)):
            source = weights
            meta = weights_metadata(weights)
            placement = json.loads(meta["placement"])
            expected = {"width": str(self.adapter.width), "config": self.config.to_json(),
                        "backbone": self.backbone.spec.name, "edit_layer": self.placement.edit_layer,
                        "im_read_layer": self.placement.read_layer}
            found = {"width": meta["width"], "config": _config(meta["config"], weights, int(meta["width"])).to_json(),
                     "backbone": meta["backbone"], "edit_layer": placement["edit_layer"],
                     "im_read_layer": placement.get("im_read_layer")}
            wrong = [f"{k}: file has {found[k]!r}, editor has {expected[k]!r}"
                     for k in expected if found[k] != expected[k]]
            if wrong:
                raise ArtifactError(f"{weights}: adapter weights do not fit this editor ({'; '.join(wrong)})")
            weights, _ = read_safetensors(weights, "VisEdit adapter weights file")
        # The scene gate's reference is [positions, width], its length the backbone's: known from the file.
        check_state_dict(weights, self.adapter.state_dict(), source, "this editor's adapter weights",
                         free={"scene.reference": (None, self.adapter.width)})
        device = self.adapter.vead.begin.weight.device
        self.adapter.load_state_dict({k: v.to(device) for k, v in weights.items()})


def _config(text: str, path: str | Path, width: int) -> VeadConfig:
    """A weights file's config as the editor reads it now (fields added since filled with what files
    written before them meant), each field of the type its default has, the sizes fitting ``width``."""
    where = f"{path}: metadata 'config'"
    data = parse_json(text, where)
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected a JSON object, found {json.dumps(data)[:40]}")
    defaults = VeadConfig().to_json()
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise ArtifactError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    for key, default in defaults.items():
        require(data, key, type(default), where, default=None)
    config = VeadConfig.from_json(data)
    if not isinstance(getattr(torch, config.dtype, None), torch.dtype) or not config.torch_dtype.is_floating_point:
        raise ArtifactError(f"{where}, field 'dtype': {config.dtype!r} is not a torch floating point type")
    small = {k: v for k, v in config.to_json().items() if type(v) is int and v < 1}
    if small:
        raise ArtifactError(f"{where}: sizes must be positive, found {small}")
    try:
        config.check(width)
    except ValueError as error:
        raise ArtifactError(f"{where}: {error}") from None
    return config


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The metadata a `save_weights` file carries, checked: the format, a positive ``width``, a
    ``backbone`` name, a ``config`` that fits the width and a ``placement`` (JSON objects). Unreadable
    files, files of another format and missing or malformed fields raise `ArtifactError`."""
    meta = safetensors_metadata(path, "VisEdit adapter weights file")
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ArtifactError(f"{path}: not a VisEdit adapter file (format {meta.get('format')!r}, "
                            f"expected {WEIGHTS_FORMAT!r})")
    missing = [key for key in ("width", "backbone", "config", "placement") if key not in meta]
    if missing:
        raise ArtifactError(f"{path}: adapter weights lack metadata {', '.join(map(repr, missing))}")
    if not (meta["width"].isascii() and meta["width"].isdigit()) or int(meta["width"]) < 1:
        raise ArtifactError(f"{path}: metadata 'width' is {meta['width']!r}, expected a positive whole number")
    _config(meta["config"], path, int(meta["width"]))
    check_placement(parse_json(meta["placement"], f"{path}: metadata 'placement'"), f"{path}: metadata 'placement'")
    return meta


def weights_config(path: str | Path) -> VeadConfig:
    """The `VeadConfig` a weights file was saved with."""
    meta = weights_metadata(path)
    return _config(meta["config"], path, int(meta["width"]))


def weights_placement(path: str | Path) -> EditPlacement:
    """The placement (edit layer, IT layers, IM read layer) a weights file was trained for."""
    return EditPlacement.coerce(json.loads(weights_metadata(path)["placement"]))
