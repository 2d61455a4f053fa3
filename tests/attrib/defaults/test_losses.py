"""The default models' training losses: the language loss with its terms, the vision stage's labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attrib.backbones.loader import load_backbone
from attrib.defaults.batches import (
    Templates,
)
from attrib.defaults.looks import (
    CrossAttentionTap,
    layout_cells,
    layout_loss,
)
from attrib.defaults.losses import language_loss, patch_labels
from attrib.defaults.recipe import Stage
from attrib.world import WorldConfig, WorldSampler, generate_scene


def loss_with(model, processor, spec, templates, sampler, n_images: int = 2, questions_per_image: int = 2,
              n_facts: int = 0, fact_weight: float = 0.0, **fields) -> torch.Tensor:
    """`language_loss` of a one-off stage with these batch sizes and fields."""
    stage = Stage("test", "language", 1, 1e-3, {}, batch_images=n_images, questions_per_image=questions_per_image,
                  facts=n_facts, fact_weight=fact_weight, **fields)
    return language_loss(model, processor, spec, templates, sampler, stage)


def test_patch_labels_cover_objects():
    scene = generate_scene(np.random.default_rng(0), WorldConfig())
    labels = patch_labels(scene, 8, 8)
    covered = sum(((o.box[2] - o.box[0]) // 8) * ((o.box[3] - o.box[1]) // 8) for o in scene.objects)
    assert (labels[0] > 0).sum().item() == covered
    assert ((labels[:3] > 0).sum(0) % 3 == 0).all()  # colour, shape and size labelled together
    rows, cols = labels[3].view(8, 8), labels[4].view(8, 8)
    assert (rows[:, 0] == torch.arange(8)).all() and (rows[2] == 2).all()
    assert (cols[0] == torch.arange(8)).all() and (cols[:, 5] == 5).all()


class _Asked(Exception):
    pass


def test_language_loss_asks_both_questions_of_a_pair_on_one_image(tiny_dirs, monkeypatch):
    from attrib.defaults import losses

    backbone = load_backbone("llava", tiny_dirs["llava"])
    templates = Templates(backbone.prompt_template, backbone.text_template)
    asked = {}

    def capture(model, processor, spec, templates, images, pairs, **kwargs):
        asked["pairs"] = pairs
        raise _Asked

    monkeypatch.setattr(losses, "continuation_logits", capture)
    triple = ("blue", "yellow", "purple")

    def questions(**options):
        with pytest.raises(_Asked):
            loss_with(backbone.model, backbone.processor, backbone.spec, templates, WorldSampler(seed=3),
                          n_images=12, questions_per_image=4, n_facts=0, fact_weight=0.0,
                          family_weights={"exists": 1.0}, **options)
        return asked["pairs"]

    def adjacent_pairs(images) -> int:
        count = 0
        for image in images:
            assert len(image) == 4
            for (no, no_answer), (yes, yes_answer) in zip(image, image[1:]):
                differ = [(a, b) for a, b in zip(no.split(), yes.split()) if a != b]
                count += ((no_answer, yes_answer) == ("no", "yes") and len(differ) == 1
                          and set(differ[0]) <= set(triple))
        return count

    assert adjacent_pairs(questions(exists_pairs=1.0, pair_colors=triple)) >= 6
    assert adjacent_pairs(questions()) <= 1  # the plain draw rarely asks them side by side


def _loss_setup(tiny_dirs, name):
    """(model, spec, language_loss's leading arguments, a small batch) of a tiny backbone."""
    backbone = load_backbone(name, tiny_dirs[name])
    model, spec = backbone.model, backbone.spec
    templates = Templates(backbone.prompt_template, backbone.text_template)
    return model, spec, (model, backbone.processor, spec, templates), dict(
        n_images=2, questions_per_image=2, n_facts=0, fact_weight=0.0)


def test_object_attention_term_joins_the_language_loss_of_a_grid_backbone(tiny_dirs):
    model, _, args, batch = _loss_setup(tiny_dirs, "llava")
    batch["family_weights"] = {"color_of_shape": 1.0}
    with pytest.raises(ValueError, match="eager"):  # sdpa gives no attention weights
        loss_with(*args, WorldSampler(seed=1), attend_layers=(0,), attend_weight=1.0, **batch)
    model.set_attn_implementation("eager")
    try:
        plain = loss_with(*args, WorldSampler(seed=1), **batch)
        with_term = loss_with(*args, WorldSampler(seed=1), attend_layers=(0, 1), attend_weight=1.0, **batch)
        from_words = loss_with(*args, WorldSampler(seed=1), attend_layers=(0, 1), attend_weight=1.0,
                                   attend_from="directions", **{**batch, "family_weights": {"position": 1.0}})
        with pytest.raises(ValueError, match="attend_from"):
            loss_with(*args, WorldSampler(seed=1), attend_layers=(0,), attend_weight=1.0, attend_from="x", **batch)
    finally:
        model.set_attn_implementation("sdpa")
    # Colour of a shape always names one object, so the term is a positive -log(share) on every row.
    assert with_term.item() > plain.item() + 0.1
    # Position questions only: the same batch without the term is the plain loss of those rows.
    position_only = loss_with(*args, WorldSampler(seed=1), **{**batch, "family_weights": {"position": 1.0}})
    assert from_words.item() > position_only.item() + 0.1


@pytest.mark.parametrize("name", ["blip2", "minigpt4"])
def test_object_attention_term_reaches_the_patches_through_a_qformer(tiny_dirs, name):
    model, spec, args, batch = _loss_setup(tiny_dirs, name)
    with pytest.raises(ValueError, match="eager"):
        loss_with(*args, WorldSampler(seed=1), attend_layers=(0,), attend_weight=1.0, **batch)
    model.set_attn_implementation("eager")
    try:
        for attend_from, family in (("answer", "color_of_shape"), ("directions", "position")):
            plain = loss_with(*args, WorldSampler(seed=1), **{**batch, "family_weights": {family: 1.0}})
            looked = loss_with(*args, WorldSampler(seed=1), attend_layers=(0, 1), attend_weight=1.0,
                                   attend_from=attend_from, **{**batch, "family_weights": {family: 1.0}})
            # An untrained Q-Former spreads every query over the image: a positive -log(share) per look.
            assert looked.item() > plain.item() + 0.1, attend_from
            (looked - plain).backward()  # the same batch: the difference is the term alone
            cross = model.get_submodule(f"{spec.bridge[0]}.encoder.layer.0.crossattention.attention")
            # The term reaches the Q-Former's cross-attention (the tiny one starts from zero query tokens, so
            # only the query bias gets gradient through the scores at first).
            assert sum(p.grad.abs().sum() for p in cross.parameters() if p.grad is not None) > 0
            model.zero_grad(set_to_none=True)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("name", ["blip2", "minigpt4"])
def test_layout_term_joins_the_language_loss_of_a_qformer_backbone(tiny_dirs, name):
    model, spec, args, batch = _loss_setup(tiny_dirs, name)
    cross = model.get_submodule(f"{spec.bridge[0]}.encoder.layer.0.crossattention.attention")
    with pytest.raises(ValueError, match="eager"):  # sdpa gives no attention weights
        loss_with(*args, WorldSampler(seed=1), layout_weight=1.0, **batch)
    assert not cross._forward_hooks  # the tap leaves no hook behind, even on an error
    model.set_attn_implementation("eager")
    try:
        plain = loss_with(*args, WorldSampler(seed=1), **batch)
        with_term = loss_with(*args, WorldSampler(seed=1), layout_weight=1.0, **batch)
        with CrossAttentionTap(cross) as tap:
            model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1),
                          encoder_hidden_states=torch.randn(2, 17, model.config.vision_config.hidden_size))
        weights = tap.weights
    finally:
        model.set_attn_implementation("sdpa")
    assert not cross._forward_hooks
    assert weights.shape == (2, model.config.qformer_config.num_attention_heads, 4, 17)
    # Attention of an untrained Q-Former spreads over the image: a positive -log(share) per query.
    expected = layout_loss(weights, layout_cells(4, 4), has_cls=True)
    assert expected.item() > 0.5 and with_term.item() > plain.item() + 0.5
    # With the layout, the queries form the grid the object attention term looks over.
    model.set_attn_implementation("eager")
    try:
        looked = loss_with(*args, WorldSampler(seed=1), layout_weight=1.0, attend_layers=(0, 1),
                               attend_weight=1.0, **{**batch, "family_weights": {"color_of_shape": 1.0}})
        unlooked = loss_with(*args, WorldSampler(seed=1), layout_weight=1.0,
                                 **{**batch, "family_weights": {"color_of_shape": 1.0}})
    finally:
        model.set_attn_implementation("sdpa")
    assert looked.item() > unlooked.item() + 0.1
    llava = load_backbone("llava", tiny_dirs["llava"])
    with pytest.raises(ValueError, match="Q-Former"):
        loss_with(llava.model, llava.processor, llava.spec, args[3], WorldSampler(seed=1),
                      layout_weight=1.0, **batch)


@pytest.mark.parametrize("name", ["llava", "blip2", "minigpt4"])
def test_bf16_autocast_loss_and_gradients_follow_the_fp32_ones(tiny_dirs, name):
    """The bf16 recipes' shortcut (eager attention under bf16 autocast) against fp32 sdpa on one batch."""
    model, _, args, batch = _loss_setup(tiny_dirs, name)
    batch["n_facts"], batch["fact_weight"] = 2, 0.5

    def loss_and_grad():
        model.zero_grad(set_to_none=True)
        loss = loss_with(*args, WorldSampler(seed=3), **batch)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return loss.item(), grad

    exact, exact_grad = loss_and_grad()
    model.set_attn_implementation("eager")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, fast_grad = loss_and_grad()
    finally:
        model.set_attn_implementation("sdpa")
        model.zero_grad(set_to_none=True)
    assert fast != exact  # bf16 matmuls did run
    assert fast == pytest.approx(exact, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(fast_grad, exact_grad, dim=0).item() > 0.99


def test_direction_layers_add_the_direction_words_term_beside_the_answers(tiny_dirs):
    """One stage grounding both: the answer's looks at some layers plus the direction words' at others is
    the plain loss plus each term as its own stage computes it (same draws)."""
    model, _, args, batch = _loss_setup(tiny_dirs, "llava")
    batch["family_weights"] = {"position": 1.0, "color_of_shape": 1.0}
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            def loss(**kw):
                return loss_with(*args, WorldSampler(seed=5), **batch, **kw).item()
            plain = loss()
            answer = loss(attend_layers=(1,), attend_weight=1.0)
            words = loss(attend_layers=(0,), attend_weight=1.0, attend_from="directions")
            both = loss(attend_layers=(1,), attend_weight=1.0, direction_layers=(0,))
        with pytest.raises(ValueError, match="direction_layers"):
            loss(attend_layers=(0,), attend_weight=1.0, attend_from="directions", direction_layers=(1,))
    finally:
        model.set_attn_implementation("sdpa")
    assert words > plain + 0.01 and answer > plain + 0.01
    assert both == pytest.approx(plain + (answer - plain) + (words - plain), abs=1e-5)


