"""Turning (image, prompt) pairs into model inputs, and finding the visual tokens in them.

LLaVA and BLIP-2 use their own HF processors. MiniGPT-4 has none in transformers: its image tokens sit
inside the prompt (``<Img><image></Img>``), so `TemplateProcessor` expands the placeholder in place and
runs the image processor beside the tokenizer, with the same call signature as an HF processor.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from attrib.backbones.spec import IMAGE_PLACEHOLDER
from attrib.errors import ArtifactError
from attrib.io import atomic_write_json, read_json, require

TEMPLATE_PROCESSOR_FILE = "template_processor.json"


class TemplateProcessor:
    """Processor for backbones whose image placeholders are expanded inside the prompt text.

    ``processor(images=[img], text=["... <image> ..."], return_tensors="pt")`` gives ``input_ids``,
    ``attention_mask`` and ``pixel_values``; each ``<image>`` becomes ``num_image_tokens`` image tokens.
    """

    def __init__(self, image_processor, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int,
                 image_token: str = IMAGE_PLACEHOLDER):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def __call__(self, images=None, text=None, return_tensors: str | None = "pt", padding: bool = False,
                 **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("TemplateProcessor needs text (the prompt carries the image placeholder)")
        texts = [text] if isinstance(text, str) else list(text)
        n_images = 0 if images is None else (len(images) if isinstance(images, (list, tuple)) else 1)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != n_images:
            raise ValueError(
                f"{placeholders} {self.image_token!r} placeholders in the text for {n_images} images; "
                "put one placeholder per image in the prompt template"
            )
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
        encoding = dict(self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **kwargs))
        if images is not None:
            encoding.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(encoding, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        settings = {"num_image_tokens": self.num_image_tokens, "image_token": self.image_token,
                    "image_processor_class": type(self.image_processor).__name__}
        atomic_write_json(path / TEMPLATE_PROCESSOR_FILE, settings)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TemplateProcessor":
        """The processor saved in ``path``; a malformed ``template_processor.json`` (not an object, a field
        missing or of the wrong type, no image processor class of that name, an image token the tokenizer
        lacks) raises `ArtifactError` naming the file and field."""
        path = Path(path)
        settings_file = path / TEMPLATE_PROCESSOR_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{settings_file}: missing; expected the TemplateProcessor settings "
                                    "(num_image_tokens, image_token, image_processor_class)")
        settings = read_json(settings_file, "TemplateProcessor settings (an object)", ArtifactError)
        where = str(settings_file)
        n_tokens = require(settings, "num_image_tokens", int, where)
        image_token = require(settings, "image_token", str, where)
        class_name = require(settings, "image_processor_class", str, where)
        if n_tokens < 1:
            raise ArtifactError(f"{where}, field 'num_image_tokens': {n_tokens} is not a positive count")
        if not image_token:
            raise ArtifactError(f"{where}, field 'image_token': empty")
        image_processor_class = _image_processor_class(class_name, f"{where}, field 'image_processor_class'")
        image_processor = image_processor_class.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ArtifactError(f"{where}, field 'image_token': {image_token!r:.80} is not a token of the "
                                f"tokenizer in {path}")
        return cls(image_processor, tokenizer, n_tokens, image_token)


def _image_processor_class(name: str, where: str) -> type:
    """The transformers image processor class called ``name``; any other name is refused (the settings
    file must not be able to make the loader build some other transformers object)."""
    try:
        found = getattr(transformers, name, None)
    except (ImportError, RuntimeError):  # a class whose optional backend is not installed
        found = None
    if not (isinstance(found, type) and issubclass(found, BaseImageProcessor)):
        raise ArtifactError(f"{where}: {name!r:.80} is not an image processor class of transformers "
                            f"{transformers.__version__}")
    return found


def locate_visual_tokens(input_ids: torch.Tensor, image_token_id: int, expected: int,
                         backbone: str = "model") -> torch.Tensor:
    """Positions of the image tokens in each row of ``input_ids`` [B, T] → LongTensor [B, expected].

    Refuses rows whose placeholder count differs from ``expected``: BLIP-2-family models would
    otherwise silently ignore the image (no placeholders) or misplace it (too few).
    """
    mask = input_ids == image_token_id  # [B, T]
    counts = mask.sum(dim=1)
    for row, count in enumerate(counts.tolist()):
        if count != expected:
            raise ValueError(
                f"{backbone} input row {row} has {count} image placeholder tokens (id {image_token_id}), "
                f"expected {expected}; without them the image is ignored — build inputs with Backbone.encode()"
            )
    return mask.nonzero()[:, 1].view(input_ids.shape[0], expected)
