"""Loading a backbone from a local Hugging Face directory: model, processor and spec in one object."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, BatchFeature, PreTrainedModel

from attrib.backbones.processing import TemplateProcessor, locate_visual_tokens
from attrib.backbones.spec import BackboneSpec, get_spec

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

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def config(self):
        return self.model.config

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
        """Batch of model inputs for ``prompts`` put into the template, left-padded.

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
        return inputs

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
        """LongTensor [B, n_visual_tokens]: where the image tokens are in each row (checked)."""
        return locate_visual_tokens(input_ids, self.image_token_id, self.n_visual_tokens, self.spec.name)

    def fingerprint(self) -> str:
        return model_fingerprint(self.path) if self.path is not None else "unsaved"


def load_backbone(name: str, path: str | Path, dtype: torch.dtype = torch.float32,
                  device_map: str | dict | None = None) -> Backbone:
    """Load backbone ``name`` ("llava", "blip2", "minigpt4") from the local HF directory ``path``.

    Offline only (``local_files_only``), safetensors weights, ``trust_remote_code`` off. The model is
    put in eval mode. A ``manifest.json`` beside the weights may set ``prompt_template``.
    """
    spec = get_spec(name)
    path = Path(path)
    _check_folder(path, spec)
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
    manifest_file = path / MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
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
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    text_type = (config.get("text_config") or {}).get("model_type")
    if spec.model_class not in architectures or text_type != spec.text_model_type:
        raise ValueError(f"{config_file}: architectures={architectures}, text model_type={text_type!r}; "
                         f"backbone {spec.name!r} expects {spec.model_class} with a {spec.text_model_type!r} LM")


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
