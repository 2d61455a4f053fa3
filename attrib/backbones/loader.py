"""Loading a backbone from a local Hugging Face directory: model, processor and spec in one object."""
from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, BatchFeature, PreTrainedModel

from attrib.backbones.processing import TemplateProcessor, locate_visual_tokens
from attrib.backbones.spec import BackboneSpec, get_spec
from attrib.errors import ArtifactError
from attrib.io import read_json, require

MANIFEST_FILE = "manifest.json"  # written beside the shipped default models; may override the template


@dataclass
class Backbone:
    """A loaded VLLM with the spec that says where its parts are.

    Unpacks as ``model, processor, spec = load_backbone(...)``.
    """

    model: PreTrainedModel
    processor: Any  # HF processor or TemplateProcessor: ``processor(images=..., text=...)``
    spec: BackboneSpec
    path: Path | None = None
    prompt_template: str = ""
    text_template: str = ""
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        self.prompt_template = self.prompt_template or self.spec.prompt_template
        self.text_template = self.text_template or self.spec.text_template

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.processor, self.spec))

    @classmethod
    def view(cls, base: "Backbone", **extra: Any) -> "Backbone":
        """An instance of ``cls`` (a subclass adding fields ``extra``) over ``base``'s model, processor,
        spec and templates: the same objects, not copies, so the view and ``base`` run one model."""
        return cls(**{f.name: getattr(base, f.name) for f in fields(Backbone)}, **extra)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first GPU of a spread model)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def n_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    @property
    def n_visual_tokens(self) -> int:
        return self.spec.n_visual_tokens(self.config)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def module(self, path: str) -> torch.nn.Module:
        return self.model.get_submodule(path)

    def format_prompt(self, prompt: str, with_image: bool = True) -> str:
        return (self.prompt_template if with_image else self.text_template).format(prompt=prompt)

    def encode(self, images: Sequence[Image.Image] | None, prompts: Sequence[str],
               targets: Sequence[str] | None = None) -> BatchFeature:
        """Batch of model inputs for ``prompts`` put into the template, left-padded, on the model's device.

        With ``images`` (one per prompt) the visual-token count of every row is checked. With
        ``targets``, each row is ``template(prompt) + " " + target`` (teacher forcing).
        """
        texts = [self.format_prompt(p, with_image=images is not None) for p in prompts]
        if targets is not None:
            texts = [f"{t} {a}" for t, a in zip(texts, targets, strict=True)]
        self.tokenizer.padding_side = "left"  # last prompt token at position -1 in every row
        if images is None:
            inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
        else:
            inputs = self.processor(images=list(images), text=texts, padding=True, return_tensors="pt")
            self.visual_positions(inputs["input_ids"])
        device = self.device
        return inputs if device.type == "cpu" else inputs.to(device)

    def check_inputs(self, inputs) -> None:
        """Refuse image inputs whose rows lack the right number of image placeholders."""
        if inputs.get("pixel_values") is not None:
            self.visual_positions(inputs["input_ids"])

    def forward(self, inputs, **kwargs):
        """``model(**inputs)`` after `check_inputs` (BLIP-2 would otherwise silently drop the image);
        text-only inputs run through the spec's text LM."""
        if inputs.get("pixel_values") is None:
            return self.module(self.spec.text_lm)(**inputs, **kwargs)
        self.check_inputs(inputs)
        return self.model(**inputs, **kwargs)

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, n_visual_tokens] on the CPU: where the image tokens are in each row (checked). Kept
        on the CPU whatever the model's device: the region sets it combines with live there, and CPU indices
        index GPU tensors."""
        return locate_visual_tokens(input_ids.cpu(), self.image_token_id, self.n_visual_tokens, self.spec.name)

    def fingerprint(self) -> str:
        return model_fingerprint(self.path) if self.path is not None else "unsaved"


def load_backbone(name: str, path: str | Path, dtype: torch.dtype = torch.float32,
                  device_map: str | dict | None = None) -> Backbone:
    """Load backbone ``name`` ("llava", "blip2", "minigpt4") from the local HF directory ``path``.

    Offline only (``local_files_only``), safetensors weights, ``trust_remote_code`` off. The model is
    put in eval mode. A ``manifest.json`` beside the weights may set ``prompt_template`` and
    ``text_template`` (`read_manifest`). A malformed ``config.json`` or ``manifest.json`` raises
    `ArtifactError` naming the file and field, before any weight is read.
    """
    spec = get_spec(name)
    path = Path(path)
    _check_folder(path, spec)
    manifest = read_manifest(path)
    model_class = getattr(transformers, spec.model_class)
    model = model_class.from_pretrained(
        path, dtype=dtype, device_map=device_map, local_files_only=True, use_safetensors=True,
        trust_remote_code=False,
    )
    model.eval()
    if spec.processor_class is None:
        processor = TemplateProcessor.from_pretrained(path)
    else:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return Backbone(model, processor, spec, path, manifest.get("prompt_template", ""),
                    manifest.get("text_template", ""), manifest)


def _check_folder(path: Path, spec: BackboneSpec) -> None:
    """Check ``path`` holds a model of the spec's class; errors name the path and what was expected."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; expected a local Hugging Face model folder "
                                f"(config.json + *.safetensors) for backbone {spec.name!r}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; expected the {spec.model_class} config of a "
                                f"{spec.name!r} backbone")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no *.safetensors weights; expected {spec.model_class} weights "
                                "in safetensors format")
    config = read_json(config_file, "Hugging Face config.json", ArtifactError)
    where = str(config_file)
    architectures = require(config, "architectures", list, where, default=None) or []
    text_config = require(config, "text_config", dict, where, default=None) or {}
    text_type = require(text_config, "model_type", str, f"{where}, field 'text_config'", default=None)
    if spec.model_class not in architectures or text_type != spec.text_model_type:
        raise ArtifactError(f"{config_file}: architectures={architectures!r:.200}, text model_type={text_type!r}; "
                            f"backbone {spec.name!r} expects {spec.model_class} with a {spec.text_model_type!r} LM")


def read_manifest(path: str | Path) -> dict:
    """The ``manifest.json`` of the model folder ``path`` ({} when there is none): an object whose
    templates, when given, are strings holding ``{prompt}`` and no other field (an empty one means the
    spec's); anything else raises `ArtifactError` naming the file and field."""
    manifest_file = Path(path) / MANIFEST_FILE
    if not manifest_file.is_file():
        return {}
    manifest = read_json(manifest_file, "model manifest (an object)", ArtifactError)
    for key in ("prompt_template", "text_template"):
        template = require(manifest, key, str, str(manifest_file), default=None)  # refuses a non-object too
        if not template:  # absent or empty: the spec's template
            continue
        if not _is_template(template):
            raise ArtifactError(f"{manifest_file}, field {key!r}: {template!r:.200} is not a template "
                                "holding {prompt} and no other field")
    return manifest


def _is_template(text: str) -> bool:
    """Whether ``text`` formats, with ``prompt`` as its only field name (used at least once)."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        text.format(prompt="")
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):
        return False
    return names == {"prompt"}


def model_fingerprint(path: str | Path) -> str:
    """Short content hash of a model folder: config.json plus, per weight file, its size, its
    safetensors header and the first and last MiB of data (cheap even for 7B checkpoints)."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read())
    return digest.hexdigest()[:16]
