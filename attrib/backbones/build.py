"""Building backbones from configs at any size: the tiny test models and the world defaults' start.

`build_backbone(name, sizes, tokenizer)` returns a randomly initialised model of the real HF class
with its processor; `save_backbone` writes a plain HF folder that `load_backbone` reads back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import (
    Blip2Config,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from attrib.backbones.loader import MANIFEST_FILE
from attrib.backbones.processing import TemplateProcessor
from attrib.backbones.spec import IMAGE_PLACEHOLDER, BackboneSpec, get_spec
from attrib.io import atomic_folder, atomic_write_json


@dataclass(frozen=True)
class BackboneSizes:
    """Widths and depths of a built backbone. Defaults are the tiny test size."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 64
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_mlp: int = 64
    num_query_tokens: int = 4
    qformer_hidden: int = 32
    qformer_layers: int = 1
    qformer_heads: int = 2
    qformer_mlp: int = 64
    max_positions: int = 512


def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _llama_config(s: BackboneSizes, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s.text_hidden, num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads, num_key_value_heads=s.text_heads, intermediate_size=s.text_mlp,
        max_position_embeddings=s.max_positions, tie_word_embeddings=False, **_token_ids(tokenizer),
    )


def _opt_config(s: BackboneSizes, tokenizer: PreTrainedTokenizerBase) -> OPTConfig:
    return OPTConfig(
        vocab_size=len(tokenizer), hidden_size=s.text_hidden, word_embed_proj_dim=s.text_hidden,
        num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads, ffn_dim=s.text_mlp,
        max_position_embeddings=s.max_positions, **_token_ids(tokenizer),
    )


def _llava_config(s: BackboneSizes, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=s.vision_hidden, num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
        intermediate_size=s.vision_mlp, image_size=s.image_size, patch_size=s.patch_size,
        projection_dim=s.vision_hidden,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(), text_config=_llama_config(s, tokenizer).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=(s.image_size // s.patch_size) ** 2,
        tie_word_embeddings=False,
    )


def _blip2_family_config(s: BackboneSizes, tokenizer: PreTrainedTokenizerBase, text) -> Blip2Config:
    vision = Blip2VisionConfig(
        hidden_size=s.vision_hidden, num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
        intermediate_size=s.vision_mlp, image_size=s.image_size, patch_size=s.patch_size,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=s.qformer_hidden, num_hidden_layers=s.qformer_layers,
        num_attention_heads=s.qformer_heads, intermediate_size=s.qformer_mlp,
        encoder_hidden_size=s.vision_hidden, vocab_size=len(tokenizer),
    )
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=s.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), tie_word_embeddings=False,
    )


# One config builder per backbone: the only per-name table outside the specs themselves.
CONFIG_BUILDERS: dict[str, Callable[[BackboneSizes, PreTrainedTokenizerBase], Any]] = {
    "llava": _llava_config,
    "blip2": lambda s, tok: _blip2_family_config(s, tok, _opt_config(s, tok)),
    "minigpt4": lambda s, tok: _blip2_family_config(s, tok, _llama_config(s, tok)),
}


def build_processor(spec: BackboneSpec, config, tokenizer: PreTrainedTokenizerBase):
    """The processor a backbone of ``spec`` uses, built from a tokenizer and the model config."""
    vision = config.vision_config
    side = {"height": vision.image_size, "width": vision.image_size}
    image_processor_class = getattr(transformers, spec.image_processor_class)
    if spec.image_processor_class == "CLIPImageProcessorPil":
        image_processor = image_processor_class(size={"shortest_edge": vision.image_size}, crop_size=side)
    else:
        image_processor = image_processor_class(size=side)
    n_tokens = spec.n_visual_tokens(config)
    if spec.processor_class is None:
        return TemplateProcessor(image_processor, tokenizer, n_tokens)
    processor_class = getattr(transformers, spec.processor_class)
    if spec.processor_class == "LlavaProcessor":
        return processor_class(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision.patch_size, num_additional_image_tokens=1,
                               vision_feature_select_strategy=config.vision_feature_select_strategy)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=n_tokens)


def build_backbone(name: str, sizes: BackboneSizes, tokenizer: PreTrainedTokenizerBase, seed: int = 0):
    """Randomly initialised (seeded) model of backbone ``name`` at ``sizes``, with its processor."""
    spec = get_spec(name)
    config = CONFIG_BUILDERS[name](sizes, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config).eval()
    return model, build_processor(spec, config, tokenizer)


def save_backbone(model: PreTrainedModel, processor, out_dir: str | Path, manifest: dict | None = None) -> Path:
    """Write a plain HF folder (config, safetensors, tokenizer, processor[, manifest.json]).

    The folder is built beside ``out_dir`` and renamed into place (`attrib.io.atomic_folder`), so a killed
    save leaves the previous folder or none, never a half-written model. An existing ``out_dir`` is
    replaced when it is empty or a model folder (has config.json); any other folder is refused."""
    out_dir = Path(out_dir)
    other = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if other and not (out_dir / "config.json").is_file():
        raise FileExistsError(f"{out_dir}: not empty and not a model folder; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out_dir, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if manifest is not None:
            atomic_write_json(tmp / MANIFEST_FILE, manifest)
    return out_dir


def sizes_dict(sizes: BackboneSizes) -> dict:
    return asdict(sizes)
