"""Converting the original MiniGPT-4 (Vicuna-7B v0) weights into a folder `load_backbone("minigpt4", ...)` reads.

MiniGPT-4 was never released in HF format. Its parts, mapped here onto `Blip2ForConditionalGeneration`
with a Llama ``text_config``:
- ViT + Q-Former in LAVIS naming: ``blip2_pretrained_flant5xxl.pth`` has ``ln_vision``, ``query_tokens``,
  ``Qformer.*``. The frozen EVA ViT-g is not in the released BLIP-2 checkpoints (LAVIS saves trainable
  weights only) but in ``eva_vit_g.pth`` with bare keys: pass it as ``eva_vit`` unless the first file
  has ``visual_encoder.*``.
- ``llama_proj`` (Linear, Q-Former width → LM width) from ``pretrained_minigpt4_7b.pth``.
- the LM and tokenizer from a Vicuna-7B v0 HF folder.

Canonical pattern::

    convert_minigpt4("blip2_pretrained_flant5xxl.pth", "pretrained_minigpt4_7b.pth", "vicuna-7b", "out",
                     eva_vit="eva_vit_g.pth")     # or: visedit convert-minigpt4 --help
    model, processor, spec = load_backbone("minigpt4", "out")

Gotchas: head counts cannot be read off shapes; they default to the real head widths (88 for EVA ViT-g,
64 for the BERT-base Q-Former): pass ``vision_heads`` / ``qformer_heads`` for other sizes. HF runs
``ln_vision`` at the ViT's eps (1e-6), LAVIS at 1e-5. Leftover source keys are fatal unless listed in
`KNOWN_UNUSED`; the dropped ones are listed in manifest.json.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from attrib.backbones.build import build_processor, save_backbone
from attrib.backbones.spec import IMAGE_PLACEHOLDER, MINIGPT4

log = logging.getLogger(__name__)
IMAGE_TOKEN_NOTE = (
    "TemplateProcessor expands the one '<image>' of the template into {n} tokens of id {id}; "
    "Blip2ForConditionalGeneration writes the projected Q-Former outputs over them in order, so they sit "
    "between '<Img>' and '</Img>' as in the original, which spliced the same embeddings between the two "
    "halves of the prompt (token boundaries next to the image may differ from its per-segment tokenisation).")

Source = str | Path | Mapping[str, torch.Tensor]
VIT, QFORMER, PROJ = "vit", "qformer", "proj"  # which source file a tensor must come from
EVA_HEAD_WIDTH, BERT_HEAD_WIDTH = 88, 64  # EVA ViT-g: 1408 / 16 heads; BERT-base: 768 / 12 heads

# Source keys that MiniGPT-4 never reads: dropped and reported, never fatal. Anything else left over is.
KNOWN_UNUSED: tuple[tuple[str, str], ...] = (
    (r"^Qformer\.bert\.embeddings\.(word_embeddings\.|position_embeddings\.|position_ids$)",
     "Q-Former text embeddings (MiniGPT-4 feeds the Q-Former query tokens only)"),
    (r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
     "Q-Former text FFN (query tokens run through intermediate_query / output_query)"),
    (r"^Qformer\.cls\.", "Q-Former text LM head (BLIP-2 stage-1 losses)"),
    (r"^((t5|opt|llm|vision|text)_proj|itm_head)\.|^temp$",
     "heads of other BLIP-2 models and of the stage-1 losses"),
    (r"^visual_encoder\.(norm|fc_norm|head)\.", "EVA classification head (LAVIS never builds it)"),
)


@dataclass(frozen=True)
class SourceSizes:
    """Sizes read off the source tensors. `symbols` names them as in the shape error messages."""

    vit_width: int  # D
    vit_mlp: int  # F
    patch_size: int  # K
    vit_tokens: int  # T = (image_size / K)^2 patches + CLS
    vit_layers: int
    qformer_width: int  # Q
    qformer_mlp: int  # H
    num_query_tokens: int  # N
    qformer_layers: int
    cross_attention_frequency: int  # layer i has cross-attention iff i % frequency == 0 (as in HF)
    lm_width: int  # L

    def symbols(self) -> dict[str, int]:
        return {"D": self.vit_width, "F": self.vit_mlp, "K": self.patch_size, "T": self.vit_tokens,
                "Q": self.qformer_width, "H": self.qformer_mlp, "N": self.num_query_tokens, "L": self.lm_width}


@dataclass(frozen=True)
class Slot:
    """One source tensor: the file role it comes from, its LAVIS key, its HF key, its symbolic shape."""

    source: str
    key: str
    target: str
    shape: tuple[str, ...]  # e.g. ("3*D", "D"); see `_dim`


def _linear(source: str, key: str, target: str, out: str, inp: str) -> list[Slot]:
    return [Slot(source, f"{key}.weight", f"{target}.weight", (out, inp)),
            Slot(source, f"{key}.bias", f"{target}.bias", (out,))]


def _norm(source: str, key: str, target: str, width: str) -> list[Slot]:
    return [Slot(source, f"{key}.{p}", f"{target}.{p}", (width,)) for p in ("weight", "bias")]


def lavis_slots(s: SourceSizes) -> list[Slot]:
    """Every ViT, Q-Former and projection tensor MiniGPT-4 uses, LAVIS name → Blip2 name.

    EVA's ``q_bias`` / ``v_bias`` map to temporary ``self_attn.{q,v}_bias`` targets that
    `_fuse_qkv_bias` turns into HF's single ``qkv.bias``.
    """
    v, emb = "visual_encoder", "vision_model.embeddings"
    slots = [
        Slot(VIT, f"{v}.cls_token", f"{emb}.class_embedding", ("1", "1", "D")),
        Slot(VIT, f"{v}.pos_embed", f"{emb}.position_embedding", ("1", "T", "D")),
        Slot(VIT, f"{v}.patch_embed.proj.weight", f"{emb}.patch_embedding.weight", ("D", "3", "K", "K")),
        Slot(VIT, f"{v}.patch_embed.proj.bias", f"{emb}.patch_embedding.bias", ("D",)),
        *_norm(QFORMER, "ln_vision", "vision_model.post_layernorm", "D"),
        Slot(QFORMER, "query_tokens", "query_tokens", ("1", "N", "Q")),
        *_norm(QFORMER, "Qformer.bert.embeddings.LayerNorm", "qformer.layernorm", "Q"),
        *_linear(PROJ, "llama_proj", "language_projection", "L", "Q"),
    ]
    for i in range(s.vit_layers):
        src, dst = f"{v}.blocks.{i}", f"vision_model.encoder.layers.{i}"
        slots += [*_norm(VIT, f"{src}.norm1", f"{dst}.layer_norm1", "D"),
                  *_norm(VIT, f"{src}.norm2", f"{dst}.layer_norm2", "D"),
                  Slot(VIT, f"{src}.attn.qkv.weight", f"{dst}.self_attn.qkv.weight", ("3*D", "D")),
                  Slot(VIT, f"{src}.attn.q_bias", f"{dst}.self_attn.q_bias", ("D",)),
                  Slot(VIT, f"{src}.attn.v_bias", f"{dst}.self_attn.v_bias", ("D",)),
                  *_linear(VIT, f"{src}.attn.proj", f"{dst}.self_attn.projection", "D", "D"),
                  *_linear(VIT, f"{src}.mlp.fc1", f"{dst}.mlp.fc1", "F", "D"),
                  *_linear(VIT, f"{src}.mlp.fc2", f"{dst}.mlp.fc2", "D", "F")]
    for i in range(s.qformer_layers):
        src, dst = f"Qformer.bert.encoder.layer.{i}", f"qformer.encoder.layer.{i}"
        blocks = ["attention"] + (["crossattention"] if i % s.cross_attention_frequency == 0 else [])
        for block in blocks:
            kv_width = "D" if block == "crossattention" else "Q"  # cross-attention keys read ViT states
            for name, inp in (("query", "Q"), ("key", kv_width), ("value", kv_width)):
                slots += _linear(QFORMER, f"{src}.{block}.self.{name}", f"{dst}.{block}.attention.{name}", "Q", inp)
            slots += [*_linear(QFORMER, f"{src}.{block}.output.dense", f"{dst}.{block}.output.dense", "Q", "Q"),
                      *_norm(QFORMER, f"{src}.{block}.output.LayerNorm", f"{dst}.{block}.output.LayerNorm", "Q")]
        slots += [*_linear(QFORMER, f"{src}.intermediate_query.dense", f"{dst}.intermediate_query.dense", "H", "Q"),
                  *_linear(QFORMER, f"{src}.output_query.dense", f"{dst}.output_query.dense", "Q", "H"),
                  *_norm(QFORMER, f"{src}.output_query.LayerNorm", f"{dst}.output_query.LayerNorm", "Q")]
    return slots


@dataclass
class Checkpoint:
    """A source state dict, the name errors use for it, and the keys the mapping consumed."""

    name: str
    tensors: dict[str, torch.Tensor]
    used: set[str] = field(default_factory=set)


def read_checkpoint(source: Source, what: str) -> Checkpoint:
    """Read a LAVIS / MiniGPT-4 checkpoint (state dict under "model", or bare) or take a dict as is."""
    if isinstance(source, Mapping):
        return Checkpoint(f"<{what} dict>", dict(source))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a file; expected the {what} checkpoint (.pth)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # never fall back to unpickling arbitrary objects
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        detail = f"it pickles {found.group(1)}" if found else "it holds objects other than tensors"
        raise ValueError(f"{path}: not loadable with weights_only=True ({detail}); re-save its state dict "
                         "with torch.save({'model': state_dict}, path)") from None
    model = loaded.get("model") if isinstance(loaded, Mapping) else None
    tensors = dict(model if isinstance(model, Mapping) else loaded)
    odd = [k for k, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if odd:
        raise ValueError(f"{path.name}: {len(odd)} entries are not tensors (e.g. {odd[:3]}); expected a state dict")
    return Checkpoint(path.name, tensors)


def _fmt(dims: Sequence) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _dim(expr: str, symbols: Mapping[str, int]) -> int:
    """Value of a symbolic dimension: an integer, a symbol ("D") or a multiple ("3*D")."""
    factor, _, name = expr.rpartition("*")
    value = int(name) if name.isdigit() else symbols[name]
    return value * (int(factor) if factor else 1)


def _anchor(ckpt: Checkpoint, key: str, dims: tuple[str, ...], hint: str = "") -> tuple[int, ...]:
    """Shape of a tensor that defines sizes; missing or of the wrong rank is a clear error."""
    if key not in ckpt.tensors:
        raise ValueError(f"{ckpt.name}: key {key!r} is missing (expected shape {_fmt(dims)}){hint}")
    shape = tuple(ckpt.tensors[key].shape)
    if len(shape) != len(dims):
        raise ValueError(f"{ckpt.name}: key {key!r} has shape {_fmt(shape)}, expected {_fmt(dims)}")
    return shape


def _count_layers(ckpt: Checkpoint, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in ckpt.tensors if (m := pattern.match(k))), default=-1)


def infer_sizes(vit: Checkpoint, qformer: Checkpoint, lm_width: int, image_size: int,
                num_query_tokens: int) -> SourceSizes:
    """Read ViT and Q-Former sizes off the tensors; check them against ``image_size`` and the query count."""
    no_vit = ("; no ViT weights here — the released BLIP-2 checkpoints leave the frozen EVA ViT out: "
              "pass eva_vit_g.pth as eva_vit (--eva-vit)")
    width, _, patch, _ = _anchor(vit, "visual_encoder.patch_embed.proj.weight", ("D", "3", "K", "K"), no_vit)
    tokens = _anchor(vit, "visual_encoder.pos_embed", ("1", "T", "D"))[1]
    if tokens != (image_size // patch) ** 2 + 1:
        raise ValueError(f"{vit.name}: key 'visual_encoder.pos_embed' has {tokens} positions, but image_size="
                         f"{image_size} with patch {patch} needs {(image_size // patch) ** 2 + 1}; "
                         "pass the image_size the ViT was trained at")
    _, queries, q_width = _anchor(qformer, "query_tokens", ("1", "N", "Q"))
    if queries != num_query_tokens:
        raise ValueError(f"{qformer.name}: key 'query_tokens' holds {queries} queries, num_query_tokens="
                         f"{num_query_tokens}; pass num_query_tokens={queries} if that is intended")
    layers = _count_layers(qformer, "Qformer.bert.encoder.layer")
    cross = [i for i in range(layers)
             if f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" in qformer.tensors]
    every = cross[1] - cross[0] if len(cross) > 1 else max(layers, 1)
    if not cross or cross != list(range(0, layers, every)):
        raise ValueError(f"{qformer.name}: Q-Former cross-attention in layers {cross} of {layers}; HF Blip2 "
                         "needs it in layers 0, k, 2k, ... (cross_attention_frequency = k)")
    return SourceSizes(
        vit_width=width, patch_size=patch, vit_tokens=tokens,
        vit_mlp=_anchor(vit, "visual_encoder.blocks.0.mlp.fc1.weight", ("F", "D"))[0],
        vit_layers=_count_layers(vit, "visual_encoder.blocks"), qformer_width=q_width,
        qformer_mlp=_anchor(qformer, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight", ("H", "Q"))[0],
        num_query_tokens=queries, qformer_layers=layers, cross_attention_frequency=every, lm_width=lm_width,
    )


def map_state_dict(checkpoints: Mapping[str, Checkpoint], sizes: SourceSizes) -> dict[str, torch.Tensor]:
    """Blip2 (non-LM) state dict from the sources, every tensor shape-checked; marks the keys used."""
    symbols, mapped = sizes.symbols(), {}
    for slot in lavis_slots(sizes):
        ckpt = checkpoints[slot.source]
        expected = tuple(_dim(d, symbols) for d in slot.shape)
        if slot.key not in ckpt.tensors:
            raise ValueError(f"{ckpt.name}: key {slot.key!r} is missing; expected shape {_fmt(slot.shape)} = "
                             f"{_fmt(expected)} (maps to {slot.target!r})")
        tensor = ckpt.tensors[slot.key]
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{ckpt.name}: key {slot.key!r} has shape {_fmt(tensor.shape)}, expected "
                             f"{_fmt(slot.shape)} = {_fmt(expected)}")
        ckpt.used.add(slot.key)
        mapped[slot.target] = tensor
    _fuse_qkv_bias(mapped, sizes.vit_layers)
    return mapped


def _fuse_qkv_bias(mapped: dict[str, torch.Tensor], vit_layers: int) -> None:
    # EVA has no key bias and adds cat(q_bias, 0, v_bias) to qkv; HF stores exactly that as qkv.bias.
    for i in range(vit_layers):
        attn = f"vision_model.encoder.layers.{i}.self_attn"
        q, v = mapped.pop(f"{attn}.q_bias"), mapped.pop(f"{attn}.v_bias")
        mapped[f"{attn}.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])


def leftover_report(checkpoints: Sequence[Checkpoint]) -> list[dict]:
    """Group the unused keys of each source by `KNOWN_UNUSED` reason; unknown leftovers are fatal."""
    report = []
    for ckpt in checkpoints:
        rest = sorted(set(ckpt.tensors) - ckpt.used)
        unknown = [k for k in rest if not any(re.search(p, k) for p, _ in KNOWN_UNUSED)]
        if unknown:
            raise ValueError(f"{ckpt.name}: {len(unknown)} unexpected keys not used by MiniGPT-4, e.g. "
                             f"{unknown[:5]}; is this the right checkpoint?")
        for pattern, reason in KNOWN_UNUSED:
            dropped = [k for k in rest if re.search(pattern, k)]
            if dropped:
                report.append({"source": ckpt.name, "reason": reason, "count": len(dropped), "examples": dropped[:3]})
    return report


def _heads(given: int | None, width: int, head_width: int, arg: str) -> int:
    if given is not None:
        return given
    if width % head_width:
        raise ValueError(f"cannot infer head count for width {width} (not a multiple of the real model's head "
                         f"width {head_width}); pass {arg}")
    return width // head_width


def _add_image_token(lm: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add ``<image>`` (and a pad token) to a Vicuna tokenizer if missing; new embedding rows are the mean
    of the old ones (deterministic; the ``<image>`` input row is always overwritten by image features)."""
    changes = []
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
        changes.append(f"added special token {IMAGE_PLACEHOLDER!r}")
    if tokenizer.pad_token is None:  # Backbone.encode pads batches; Vicuna ships without a pad token
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        lm.config.pad_token_id = tokenizer.pad_token_id
        changes.append(f"pad token set to {tokenizer.pad_token!r}")
    old_rows = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for matrix in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
                matrix[old_rows:] = matrix[:old_rows].float().mean(0).to(matrix.dtype)
        changes.append(f"LM embeddings resized {old_rows} -> {len(tokenizer)} rows (new rows = mean row)")
    return changes


def blip2_config(sizes: SourceSizes, text_config, image_size: int, image_token_id: int, *,
                 vision_heads: int | None = None, qformer_heads: int | None = None) -> Blip2Config:
    """The HF config for ``sizes`` with ``text_config`` (a LlamaConfig) as the LM."""
    vision = Blip2VisionConfig(
        hidden_size=sizes.vit_width, intermediate_size=sizes.vit_mlp, num_hidden_layers=sizes.vit_layers,
        num_attention_heads=_heads(vision_heads, sizes.vit_width, EVA_HEAD_WIDTH, "vision_heads"),
        image_size=image_size, patch_size=sizes.patch_size,
        hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,  # EVA: exact GELU, LayerNorm eps 1e-6
    )
    qformer = Blip2QFormerConfig(
        hidden_size=sizes.qformer_width, num_hidden_layers=sizes.qformer_layers,
        num_attention_heads=_heads(qformer_heads, sizes.qformer_width, BERT_HEAD_WIDTH, "qformer_heads"),
        intermediate_size=sizes.qformer_mlp, cross_attention_frequency=sizes.cross_attention_frequency,
        encoder_hidden_size=sizes.vit_width,
    )
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text_config.to_dict(),
        num_query_tokens=sizes.num_query_tokens, image_token_index=image_token_id,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # HF keeps the Q-Former and query tokens in float32 when it loads the model in fp16 (in bf16 it casts
    # them like the rest); store them in float32, so either load reads them at full precision.
    keep_fp32 = any(name.startswith(m) for m in Blip2ForConditionalGeneration._keep_in_fp32_modules or ())
    return tensor.to(torch.float32 if keep_fp32 else dtype) if tensor.is_floating_point() else tensor


def _vision_checkpoints(vit_qformer: Source, eva_vit: Source | None) -> tuple[Checkpoint, Checkpoint]:
    """(Q-Former checkpoint, ViT checkpoint): the same one, or the EVA ViT from its own file with its bare
    keys put under ``visual_encoder.`` (refused when both files hold ViT weights)."""
    qformer = read_checkpoint(vit_qformer, "vit_qformer")
    if eva_vit is None:
        return qformer, qformer
    vit = read_checkpoint(eva_vit, "eva_vit")
    both = [k for k in qformer.tensors if k.startswith("visual_encoder.")]
    if both:
        raise ValueError(f"{qformer.name} and {vit.name} both hold ViT weights (e.g. {both[0]!r}); pass one")
    vit.tensors = {k if k.startswith("visual_encoder.") else f"visual_encoder.{k}": t for k, t in vit.tensors.items()}
    return qformer, vit


def convert_minigpt4(vit_qformer: Source, minigpt4: Source, vicuna_dir: str | Path, out_dir: str | Path, *,
                     num_query_tokens: int = 32, image_size: int = 224, dtype: torch.dtype = torch.float16,
                     eva_vit: Source | None = None, vision_heads: int | None = None,
                     qformer_heads: int | None = None) -> Path:
    """Write an HF ``Blip2ForConditionalGeneration`` folder for MiniGPT-4 to ``out_dir`` and return it.

    ``vit_qformer``: LAVIS BLIP-2 checkpoint (``ln_vision``, ``query_tokens``, ``Qformer.*``, and
    ``visual_encoder.*`` unless ``eva_vit`` is given); ``eva_vit``: ``eva_vit_g.pth`` (bare ViT keys);
    ``minigpt4``: checkpoint with ``llama_proj``; ``vicuna_dir``: LlamaForCausalLM folder + tokenizer.
    Paths or in-memory state dicts. Errors name the source, the key and expected vs found shapes.
    """
    vicuna_dir, out_dir = Path(vicuna_dir), Path(out_dir)
    qformer, vit = _vision_checkpoints(vit_qformer, eva_vit)
    proj = read_checkpoint(minigpt4, "minigpt4")
    if not (vicuna_dir / "config.json").is_file():
        raise FileNotFoundError(f"{vicuna_dir}: no config.json; expected a Vicuna-7B HF folder (LlamaForCausalLM)")
    text_config = AutoConfig.from_pretrained(vicuna_dir, local_files_only=True)
    if text_config.model_type != "llama":
        raise ValueError(f"{vicuna_dir}: model_type={text_config.model_type!r}; expected a Llama (Vicuna) LM")

    # Everything is checked before the (large) LM is read.
    sizes = infer_sizes(vit, qformer, text_config.hidden_size, image_size, num_query_tokens)
    mapped = map_state_dict({VIT: vit, QFORMER: qformer, PROJ: proj}, sizes)
    dropped = leftover_report(list({id(c): c for c in (vit, qformer, proj)}.values()))
    for entry in dropped:
        log.info("dropped %d keys from %s: %s (e.g. %s)", entry["count"], entry["source"], entry["reason"],
                 entry["examples"][0])

    lm = LlamaForCausalLM.from_pretrained(vicuna_dir, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(vicuna_dir, local_files_only=True)
    changes = _add_image_token(lm, tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    config = blip2_config(sizes, lm.config, image_size, image_token_id, vision_heads=vision_heads,
                          qformer_heads=qformer_heads)
    mapped.update({f"language_model.{k}": t for k, t in lm.state_dict().items()})
    mapped = {k: _cast(k, t, dtype) for k, t in mapped.items()}

    with torch.device("meta"):  # no second copy of a 7B model: the mapped tensors are assigned in place
        model = Blip2ForConditionalGeneration(config)
    expected = model.state_dict()
    missing, extra = sorted(expected.keys() - mapped.keys()), sorted(mapped.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"mapping does not fit Blip2ForConditionalGeneration: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (transformers version change?)")
    model.load_state_dict(mapped, strict=True, assign=True)

    processor = build_processor(MINIGPT4, config, tokenizer)
    sources = {"vit_qformer": qformer.name, "eva_vit": None if eva_vit is None else vit.name,
               "minigpt4": proj.name, "vicuna": str(vicuna_dir)}
    manifest = {"backbone": MINIGPT4.name, "prompt_template": MINIGPT4.prompt_template,
                "image_tokens": IMAGE_TOKEN_NOTE.format(n=sizes.num_query_tokens, id=image_token_id),
                "converted_from": sources, "sizes": asdict(sizes), "dtype": str(dtype).removeprefix("torch."),
                "tokenizer_changes": changes, "dropped_keys": dropped}
    return save_backbone(model, processor, out_dir, manifest)
