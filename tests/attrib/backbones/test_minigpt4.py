"""MiniGPT-4 converter on small synthetic checkpoints that use the real LAVIS / MiniGPT-4 key names.

The key table below is written independently of `attrib.backbones.minigpt4.lavis_slots` (from LAVIS's
eva_vit.py / Qformer.py and MiniGPT-4's mini_gpt4.py), so a wrong name on either side fails the tests.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Blip2ForConditionalGeneration, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from attrib.backbones.loader import load_backbone
from attrib.backbones.minigpt4 import (
    PROJ,
    QFORMER,
    VIT,
    Checkpoint,
    blip2_config,
    convert_minigpt4,
    infer_sizes,
    map_state_dict,
)
from attrib.backbones.spec import IMAGE_PLACEHOLDER, MINIGPT4
from visedit.cli import main

D, DEPTH, F, K, IMAGE = 32, 2, 64, 8, 32  # ViT width, blocks, MLP width, patch, image side
Q, QLAYERS, H, N = 32, 2, 64, 4  # Q-Former width, layers (cross-attention in layer 0 only), FFN, queries
L = 32  # LM width
HEADS = {"vision_heads": 2, "qformer_heads": 2}


def lavis_shapes(d=D, depth=DEPTH, f=F, k=K, image=IMAGE, q=Q, qlayers=QLAYERS, h=H, n=N, lm=L):
    """(ViT, BLIP-2 Q-Former checkpoint, MiniGPT-4 checkpoint) key → shape tables, LAVIS naming.

    The ViT keys are bare, as in eva_vit_g.pth; the Q-Former has cross-attention every other layer.
    """
    vit = {"cls_token": (1, 1, d), "pos_embed": (1, (image // k) ** 2 + 1, d),
           "patch_embed.proj.weight": (d, 3, k, k), "patch_embed.proj.bias": (d,)}
    for i in range(depth):
        b = f"blocks.{i}"
        vit.update({f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,), f"{b}.norm2.weight": (d,),
                    f"{b}.norm2.bias": (d,), f"{b}.attn.qkv.weight": (3 * d, d), f"{b}.attn.q_bias": (d,),
                    f"{b}.attn.v_bias": (d,), f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,),
                    f"{b}.mlp.fc1.weight": (f, d), f"{b}.mlp.fc1.bias": (f,), f"{b}.mlp.fc2.weight": (d, f),
                    f"{b}.mlp.fc2.bias": (d,)})
    qf = {"ln_vision.weight": (d,), "ln_vision.bias": (d,), "query_tokens": (1, n, q),
          "Qformer.bert.embeddings.LayerNorm.weight": (q,), "Qformer.bert.embeddings.LayerNorm.bias": (q,),
          # text-only parts and another LM's projection: in the real file, unused by MiniGPT-4
          "Qformer.bert.embeddings.word_embeddings.weight": (50, q),
          "Qformer.bert.embeddings.position_embeddings.weight": (16, q),
          "Qformer.cls.predictions.bias": (50,), "t5_proj.weight": (48, q), "t5_proj.bias": (48,)}
    for i in range(qlayers):
        layer = f"Qformer.bert.encoder.layer.{i}"
        for block in ["attention"] + (["crossattention"] if i % 2 == 0 else []):
            kv = d if block == "crossattention" else q
            for name, inp in (("query", q), ("key", kv), ("value", kv)):
                qf.update({f"{layer}.{block}.self.{name}.weight": (q, inp), f"{layer}.{block}.self.{name}.bias": (q,)})
            out = f"{layer}.{block}.output"
            qf.update({f"{out}.dense.weight": (q, q), f"{out}.dense.bias": (q,),
                       f"{out}.LayerNorm.weight": (q,), f"{out}.LayerNorm.bias": (q,)})
        for suffix in ("", "_query"):  # "" = the text FFN, dropped
            ffn_in, ffn_out = f"{layer}.intermediate{suffix}", f"{layer}.output{suffix}"
            qf.update({f"{ffn_in}.dense.weight": (h, q), f"{ffn_in}.dense.bias": (h,),
                       f"{ffn_out}.dense.weight": (q, h), f"{ffn_out}.dense.bias": (q,),
                       f"{ffn_out}.LayerNorm.weight": (q,), f"{ffn_out}.LayerNorm.bias": (q,)})
    proj = {"llama_proj.weight": (lm, q), "llama_proj.bias": (lm,)}
    return vit, qf, proj


def fill(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}


def sources(eva_layout: bool = False) -> dict[str, dict]:
    """Seeded synthetic checkpoints; ``eva_layout``: ViT in its own dict with bare keys (eva_vit_g.pth)."""
    vit_shapes, qf_shapes, proj_shapes = lavis_shapes()
    vit, qf, proj = fill(vit_shapes, 1), fill(qf_shapes, 2), fill(proj_shapes, 3)
    if eva_layout:
        return {"vit_qformer": qf, "minigpt4": proj, "eva_vit": vit}
    return {"vit_qformer": {**{f"visual_encoder.{k}": t for k, t in vit.items()}, **qf}, "minigpt4": proj}


def save_vicuna(path, tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=L, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return lm


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer):
    """Checkpoints written as .pth files and converted through ``visedit convert-minigpt4`` (float32, so
    equality is exact)."""
    root = tmp_path_factory.mktemp("minigpt4")
    src = sources()
    torch.save({"model": src["vit_qformer"], "epoch": 3}, root / "blip2_pretrained_flant5xxl.pth")
    torch.save({"model": src["minigpt4"]}, root / "pretrained_minigpt4_7b.pth")
    lm = save_vicuna(root / "vicuna", tiny_tokenizer)
    assert main(["convert-minigpt4", "--vit-qformer", str(root / "blip2_pretrained_flant5xxl.pth"),
          "--minigpt4", str(root / "pretrained_minigpt4_7b.pth"), "--vicuna", str(root / "vicuna"),
          "--out", str(root / "out"), "--num-query-tokens", str(N), "--image-size", str(IMAGE),
          "--dtype", "float32", "--vision-heads", "2", "--qformer-heads", "2"]) == 0
    return root / "out", src, lm


def test_every_tensor_comes_from_its_source(converted):
    out, src, lm = converted
    weights = load_file(str(out / "model.safetensors"))
    qf, proj = src["vit_qformer"], src["minigpt4"]
    pairs = {
        "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
        "vision_model.encoder.layers.1.self_attn.qkv.weight": "visual_encoder.blocks.1.attn.qkv.weight",
        "vision_model.encoder.layers.1.self_attn.projection.bias": "visual_encoder.blocks.1.attn.proj.bias",
        "vision_model.encoder.layers.0.mlp.fc2.weight": "visual_encoder.blocks.0.mlp.fc2.weight",
        "vision_model.post_layernorm.weight": "ln_vision.weight",
        "query_tokens": "query_tokens",
        "qformer.layernorm.bias": "Qformer.bert.embeddings.LayerNorm.bias",
        "qformer.encoder.layer.0.crossattention.attention.key.weight":
            "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
        "qformer.encoder.layer.1.attention.attention.value.bias":
            "Qformer.bert.encoder.layer.1.attention.self.value.bias",
        "qformer.encoder.layer.1.output_query.LayerNorm.weight":
            "Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight",
    }
    for target, source in pairs.items():
        assert torch.equal(weights[target], qf[source]), target
    qkv_bias = weights["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    assert torch.equal(qkv_bias[:D], qf["visual_encoder.blocks.1.attn.q_bias"])
    assert torch.equal(qkv_bias[D:2 * D], torch.zeros(D))  # EVA has no key bias
    assert torch.equal(qkv_bias[2 * D:], qf["visual_encoder.blocks.1.attn.v_bias"])
    assert torch.equal(weights["language_projection.weight"], proj["llama_proj.weight"])
    assert torch.equal(weights["language_projection.bias"], proj["llama_proj.bias"])
    lm_weights = lm.state_dict()
    for key in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(weights[f"language_model.{key}"], lm_weights[key]), key
    assert not any("crossattention" in k for k in weights if k.startswith("qformer.encoder.layer.1."))


def test_forward_places_image_inside_img_tags(converted, tiny_images):
    out, _, _ = converted
    backbone = load_backbone("minigpt4", out)
    assert backbone.prompt_template == MINIGPT4.prompt_template
    image_processor = backbone.processor.image_processor
    assert image_processor.size == {"height": IMAGE, "width": IMAGE}
    assert tuple(image_processor.image_mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP
    inputs = backbone.encode(tiny_images[:1], ["what color is the circle?"])
    ids = inputs["input_ids"][0]
    positions = backbone.visual_positions(inputs["input_ids"])[0]
    assert positions.tolist() == list(range(int(positions[0]), int(positions[0]) + N))
    tokenizer = backbone.tokenizer
    assert tokenizer.decode(ids[: positions[0]]).endswith("<Img>")
    assert tokenizer.decode(ids[positions[-1] + 1:]).startswith("</Img>")
    with torch.no_grad():
        logits = backbone.model(**inputs).logits
        other = backbone.model(**backbone.encode(tiny_images[1:], ["what color is the circle?"])).logits
    assert logits.shape == (1, ids.shape[0], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0, -1], other[0, -1])  # the image reaches the LM


def test_vit_block_matches_the_lavis_formula(converted):
    """EVA block 0 computed from the LAVIS tensors (eva_vit.py's Block) equals the converted HF layer."""
    out, src, _ = converted
    layer = load_backbone("minigpt4", out).model.vision_model.encoder.layers[0]
    w = {k.removeprefix("visual_encoder.blocks.0."): t for k, t in src["vit_qformer"].items()
         if k.startswith("visual_encoder.blocks.0.")}
    x = torch.randn(1, (IMAGE // K) ** 2 + 1, D, generator=torch.Generator().manual_seed(4))  # [1, T, D]
    heads, tokens = HEADS["vision_heads"], x.shape[1]

    def norm(t, name):
        return nnf.layer_norm(t, (D,), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-6)

    qkv_bias = torch.cat([w["attn.q_bias"], torch.zeros(D), w["attn.v_bias"]])  # LAVIS: no key bias
    q, k, v = nnf.linear(norm(x, "norm1"), w["attn.qkv.weight"], qkv_bias).reshape(
        1, tokens, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    attended = ((q * (D // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v  # [1, heads, T, D/heads]
    mid = x + nnf.linear(attended.transpose(1, 2).reshape(1, tokens, D), w["attn.proj.weight"], w["attn.proj.bias"])
    hidden = nnf.gelu(nnf.linear(norm(mid, "norm2"), w["mlp.fc1.weight"], w["mlp.fc1.bias"]))
    expected = mid + nnf.linear(hidden, w["mlp.fc2.weight"], w["mlp.fc2.bias"])
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_real_sizes_map_onto_blip2_on_meta():
    """EVA ViT-g + BERT-base Q-Former + Vicuna-7B widths: every non-LM tensor lands with the right shape."""
    real = lavis_shapes(d=1408, depth=39, f=6144, k=14, image=224, q=768, qlayers=12, h=3072, n=32, lm=4096)

    def meta(shapes, prefix=""):
        return {prefix + k: torch.empty(shape, device="meta") for k, shape in shapes.items()}

    checkpoints = {VIT: Checkpoint("eva_vit_g.pth", meta(real[0], "visual_encoder.")),
                   QFORMER: Checkpoint("blip2_pretrained_flant5xxl.pth", meta(real[1])),
                   PROJ: Checkpoint("pretrained_minigpt4_7b.pth", meta(real[2]))}
    sizes = infer_sizes(checkpoints[VIT], checkpoints[QFORMER], lm_width=4096, image_size=224, num_query_tokens=32)
    mapped = map_state_dict(checkpoints, sizes)
    config = blip2_config(sizes, LlamaConfig(), image_size=224, image_token_id=32000)
    assert (config.vision_config.num_attention_heads, config.qformer_config.num_attention_heads) == (16, 12)
    assert sizes.cross_attention_frequency == 2
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    expected = {k: t.shape for k, t in model.state_dict().items() if not k.startswith("language_model.")}
    assert {k: t.shape for k, t in mapped.items()} == expected


def test_manifest_reports_dropped_keys(converted):
    manifest = json.loads((converted[0] / "manifest.json").read_text())
    dropped = {entry["reason"].split(" (")[0]: entry["count"] for entry in manifest["dropped_keys"]}
    assert dropped["Q-Former text FFN"] == QLAYERS * 6
    assert dropped["Q-Former text embeddings"] == 2
    assert dropped["heads of other BLIP-2 models and of the stage-1 losses"] == 2
    assert manifest["sizes"]["cross_attention_frequency"] == 2
    assert manifest["tokenizer_changes"] == []  # the tiny tokenizer already has <image> and a pad token


def test_eva_layout_adds_image_token_and_resizes(tmp_path):
    """ViT from a separate eva_vit_g-style dict; a Vicuna-like tokenizer without <image> or pad."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "###Human:": 3, "<Img>": 4, "</Img>": 5, "hi": 6, "###Assistant:": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    lm = save_vicuna(tmp_path / "vicuna", tokenizer)
    out = convert_minigpt4(**sources(eva_layout=True), vicuna_dir=tmp_path / "vicuna", out_dir=tmp_path / "out",
                           num_query_tokens=N, image_size=IMAGE, dtype=torch.float32, **HEADS)
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_index"] == len(vocab) and config["text_config"]["vocab_size"] == len(vocab) + 1
    weights = load_file(str(out / "model.safetensors"))
    embed = weights["language_model.model.embed_tokens.weight"]
    assert torch.equal(embed[: len(vocab)], lm.model.embed_tokens.weight)
    assert torch.allclose(embed[len(vocab)], lm.model.embed_tokens.weight.mean(0))
    assert weights["qformer.layernorm.weight"].dtype == torch.float32
    changes = json.loads((out / "manifest.json").read_text())["tokenizer_changes"]
    assert any(IMAGE_PLACEHOLDER in c for c in changes) and any("pad" in c for c in changes)


@pytest.fixture
def vicuna_dir(tmp_path, tiny_tokenizer):
    save_vicuna(tmp_path / "vicuna", tiny_tokenizer)
    return tmp_path / "vicuna"


def _convert(src: dict, vicuna_dir, tmp_path) -> None:
    convert_minigpt4(**src, vicuna_dir=vicuna_dir, out_dir=tmp_path / "out", num_query_tokens=N,
                     image_size=IMAGE, dtype=torch.float32, **HEADS)


def test_missing_key_names_the_key(vicuna_dir, tmp_path):
    src = sources()
    del src["vit_qformer"]["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"]
    missing = r"'Qformer\.bert\.encoder\.layer\.0\.crossattention\.self\.key\.weight' is missing"
    with pytest.raises(ValueError, match=missing):
        _convert(src, vicuna_dir, tmp_path)


def test_misshaped_key_names_key_and_both_shapes(vicuna_dir, tmp_path):
    src = sources()
    src["vit_qformer"]["visual_encoder.blocks.1.attn.qkv.weight"] = torch.zeros(3 * D, 16)
    with pytest.raises(ValueError) as error:
        _convert(src, vicuna_dir, tmp_path)
    expected = "'visual_encoder.blocks.1.attn.qkv.weight' has shape (96, 16), expected (3*D, D) = (96, 32)"
    assert expected in str(error.value)


def test_unknown_extra_key_is_fatal(vicuna_dir, tmp_path):
    src = sources()
    src["minigpt4"]["llama_model.model.layers.0.lora_A.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"<minigpt4 dict>: 1 unexpected keys .*lora_A"):
        _convert(src, vicuna_dir, tmp_path)


def test_missing_vit_points_to_eva_file(vicuna_dir, tmp_path):
    src = sources(eva_layout=True)
    del src["eva_vit"]
    with pytest.raises(ValueError, match="visual_encoder.patch_embed.proj.weight' is missing.*eva_vit"):
        _convert(src, vicuna_dir, tmp_path)
