"""Backbone specifications: one row of data per vision-language architecture.

Everything the attribution engine and the editor need to know about a backbone lives here, as data:
module paths (dotted, relative to the loaded HF model), where the visual tokens sit, where their spatial
grid lives, the prompt template and how the processor is built. Code elsewhere asks the spec; it never
tests a model's name.

Paths were checked on transformers 5.24 against the full-size architectures built on the meta device
(see ``tests/attrib/backbones/test_spec.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from transformers import PretrainedConfig

# The placeholder a template uses where the image goes; each backbone's processor (or our
# `TemplateProcessor`) expands it into the right number of image tokens.
IMAGE_PLACEHOLDER = "<image>"


def _patch_grid(config: PretrainedConfig) -> tuple[int, int]:
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return side, side


def _llava_visual_count(config: PretrainedConfig) -> int:
    rows, cols = _patch_grid(config)
    # "default" drops the CLS token; "full" keeps it in front of the patches.
    return rows * cols + (config.vision_feature_select_strategy == "full")


def _query_count(config: PretrainedConfig) -> int:
    return config.num_query_tokens


@dataclass(frozen=True)
class BackboneSpec:
    """How to find the parts of one VLLM family inside its Hugging Face model.

    Paths are dotted attribute paths for ``model.get_submodule``; ``attn``, ``attn_norm`` and
    ``mlp`` are relative to one decoder layer.
    """

    name: str
    model_class: str  # transformers class name, e.g. "LlavaForConditionalGeneration"
    text_model_type: str  # config.text_config.model_type: "llama" or "opt"
    layers: str  # ModuleList of decoder layers
    attn: str  # attention module; its output is a tuple, [0] is the residual term  # [B, T, D]
    attn_norm: str  # pre-norm whose output is the attention module's input  # [B, T, D]
    mlp: str  # module whose output is the MLP's residual term
    mlp_output_flat: bool  # OPT's fc2 returns [B*T, D] instead of [B, T, D]
    final_norm: str
    lm_head: str
    embed_tokens: str
    text_lm: str  # causal LM that runs text-only inputs (Blip2ForConditionalGeneration needs pixels); "" = root
    vision_tower: str
    bridge: tuple[str, ...]  # modules between the vision tower and the LM, in execution order
    # Where the spatial grid of image regions lives: "lm" = the LM's visual tokens form the grid
    # (LLaVA); "vit" = the grid is the ViT patch sequence, the LM sees non-spatial query tokens.
    grid_site: Literal["lm", "vit"]
    vit_has_cls: bool  # the vision tower's output starts with a CLS token before the patches
    visual_token_count: Callable[[PretrainedConfig], int]
    patch_grid: Callable[[PretrainedConfig], tuple[int, int]]
    prompt_template: str  # "{prompt}" marks the text; IMAGE_PLACEHOLDER marks the image
    text_template: str  # the same conversation format for text-only inputs (T-Loc)
    # "processor": the HF processor expands images into tokens (LLaVA in place, BLIP-2 in front);
    # "template": our TemplateProcessor expands IMAGE_PLACEHOLDER in place (MiniGPT-4).
    placeholder_expansion: Literal["processor", "template"]
    image_processor_class: str  # *ImageProcessorPil class: no torchvision needed
    processor_class: str | None  # HF processor class, or None when TemplateProcessor is used

    def n_visual_tokens(self, config: PretrainedConfig) -> int:
        """Number of image-token positions in the LM input for one image."""
        return self.visual_token_count(config)

    def grid_shape(self, config: PretrainedConfig) -> tuple[int, int]:
        """(rows, cols) of the spatial region grid: LM visual tokens or ViT patches (see grid_site)."""
        return self.patch_grid(config)

    def layer_path(self, index: int, part: str | None = None) -> str:
        """Dotted path of decoder layer ``index`` or of one of its parts ("attn", "attn_norm", "mlp")."""
        base = f"{self.layers}.{index}"
        return base if part is None else f"{base}.{getattr(self, part)}"

    def format_prompt(self, prompt: str, with_image: bool = True) -> str:
        """Put ``prompt`` into the backbone's image (or text-only) template."""
        return (self.prompt_template if with_image else self.text_template).format(prompt=prompt)


LLAVA = BackboneSpec(
    name="llava",
    model_class="LlavaForConditionalGeneration",
    text_model_type="llama",
    layers="model.language_model.layers",
    attn="self_attn",
    attn_norm="input_layernorm",
    mlp="mlp",
    mlp_output_flat=False,
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    embed_tokens="model.language_model.embed_tokens",
    text_lm="",
    vision_tower="model.vision_tower",
    bridge=("model.multi_modal_projector",),
    grid_site="lm",
    vit_has_cls=True,
    visual_token_count=_llava_visual_count,
    patch_grid=_patch_grid,
    prompt_template="USER: <image>\n{prompt} ASSISTANT:",
    text_template="USER: {prompt} ASSISTANT:",
    placeholder_expansion="processor",
    image_processor_class="CLIPImageProcessorPil",
    processor_class="LlavaProcessor",
)

BLIP2 = BackboneSpec(
    name="blip2",
    model_class="Blip2ForConditionalGeneration",
    text_model_type="opt",
    layers="language_model.model.decoder.layers",
    attn="self_attn",
    attn_norm="self_attn_layer_norm",
    mlp="fc2",
    mlp_output_flat=True,
    final_norm="language_model.model.decoder.final_layer_norm",
    lm_head="language_model.lm_head",
    embed_tokens="language_model.model.decoder.embed_tokens",
    text_lm="language_model",
    vision_tower="vision_model",
    bridge=("qformer", "language_projection"),
    grid_site="vit",
    vit_has_cls=True,
    visual_token_count=_query_count,
    patch_grid=_patch_grid,
    # Blip2Processor puts the query placeholders in front of BOS; the template marks nothing.
    prompt_template="{prompt}",
    text_template="{prompt}",
    placeholder_expansion="processor",
    image_processor_class="BlipImageProcessorPil",
    processor_class="Blip2Processor",
)

MINIGPT4 = BackboneSpec(
    name="minigpt4",
    model_class="Blip2ForConditionalGeneration",
    text_model_type="llama",
    layers="language_model.model.layers",
    attn="self_attn",
    attn_norm="input_layernorm",
    mlp="mlp",
    mlp_output_flat=False,
    final_norm="language_model.model.norm",
    lm_head="language_model.lm_head",
    embed_tokens="language_model.model.embed_tokens",
    text_lm="language_model",
    vision_tower="vision_model",
    bridge=("qformer", "language_projection"),
    grid_site="vit",
    vit_has_cls=True,
    visual_token_count=_query_count,
    patch_grid=_patch_grid,
    prompt_template="###Human: <Img><image></Img> {prompt} ###Assistant:",
    text_template="###Human: {prompt} ###Assistant:",
    placeholder_expansion="template",
    image_processor_class="BlipImageProcessorPil",
    processor_class=None,
)

SPECS: dict[str, BackboneSpec] = {spec.name: spec for spec in (LLAVA, BLIP2, MINIGPT4)}


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under ``name``; an unknown name lists the choices."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(SPECS))}") from None
