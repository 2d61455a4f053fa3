"""Configs of the real checkpoints' architectures (LLaVA-1.5-7B, BLIP-2 OPT-2.7B, MiniGPT-4 Vicuna-7B).

Built on the ``meta`` device they cost no memory and take well under a second, so tests can check the
specs' module paths, and the editor its parameter counts, at the real sizes without any weights.
"""
from __future__ import annotations

import torch
import transformers
from transformers import Blip2Config, LlamaConfig, LlavaConfig, OPTConfig, PreTrainedModel

from attrib.backbones.spec import get_spec

# Image-token ids of the published HF checkpoints (LLaVA: added token 32000; BLIP-2 OPT: 50265).
_VICUNA = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
               vocab_size=32001)
_OPT_2_7B = dict(hidden_size=2560, word_embed_proj_dim=2560, num_hidden_layers=32, num_attention_heads=32,
                 ffn_dim=10240, vocab_size=50272)
_EVA_VIT_G = dict(hidden_size=1408, num_hidden_layers=39, num_attention_heads=16, intermediate_size=6144,
                  image_size=224, patch_size=14)


def reference_config(name: str):
    """The HF config of the full-size architecture the backbone ``name`` was published with."""
    get_spec(name)  # unknown names fail with the list of choices
    if name == "llava":
        return LlavaConfig()  # its defaults are exactly LLaVA-1.5-7B
    text = OPTConfig(**_OPT_2_7B) if name == "blip2" else LlamaConfig(**_VICUNA)
    return Blip2Config(vision_config=_EVA_VIT_G, text_config=text.to_dict(), num_query_tokens=32,
                       image_token_index=50265 if name == "blip2" else 32000)


def build_on_meta(name: str) -> PreTrainedModel:
    """The full-size architecture of ``name`` on the meta device (shapes only, no memory)."""
    spec = get_spec(name)
    with torch.device("meta"):
        return getattr(transformers, spec.model_class)(reference_config(name))
