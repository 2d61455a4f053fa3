"""Training batches: the shared-prefix KV reuse gives the logits of full sequences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attrib.backbones.loader import load_backbone
from attrib.defaults.batches import (
    IGNORE,
    Templates,
    continuation_logits,
    existence_pair,
    hard_negative,
    pick_family,
    split_prompt,
    training_question,
)
from attrib.defaults.looks import (
    CrossAttentionTap,
    Look,
    answer_looks,
    direction_looks,
    layout_cells,
    layout_loss,
    object_attention_loss,
    query_spread,
    target_cells,
)
from attrib.defaults.losses import language_loss, patch_labels
from attrib.defaults.recipe import PROMPTS, Stage
from attrib.world import VQA_FAMILIES, WorldConfig, WorldSampler, generate_scene
from attrib.world.questions import Question, evaluate, feasible_families, sample_question
from attrib.world.templates import TRAIN
from attrib.world.templates import templates as family_templates


def loss_with(model, processor, spec, templates, sampler, n_images: int = 2, questions_per_image: int = 2,
              n_facts: int = 0, fact_weight: float = 0.0, **fields) -> torch.Tensor:
    """`language_loss` of a one-off stage with these batch sizes and fields."""
    stage = Stage("test", "language", 1, 1e-3, {}, batch_images=n_images, questions_per_image=questions_per_image,
                  facts=n_facts, fact_weight=fact_weight, **fields)
    return language_loss(model, processor, spec, templates, sampler, stage)


def _assert_rows_match(backbone, images, pairs, logits, labels):
    row = 0
    for image, (prompt, target) in pairs:
        full = backbone.encode([image], [prompt], [target])
        full_logits = backbone.forward(full).logits[0]
        n_target = (labels[row] != IGNORE).sum().item() - 1  # labels also cover EOS
        target_at = (labels[row] != IGNORE).nonzero()[:n_target, 0]
        # Same tokens: the continuation's target ids equal the full sequence's last ids.
        assert labels[row, target_at].tolist() == full["input_ids"][0, -n_target:].tolist()
        assert torch.allclose(logits[row, target_at - 1], full_logits[-n_target - 1:-1], atol=1e-4)
        row += 1
    assert row == len(labels)


@pytest.mark.parametrize("with_lead", [False, True])
def test_prefix_reuse_equals_full_sequences(tiny_backbone, tiny_images, with_lead):
    spec = tiny_backbone.spec
    templates = Templates(tiny_backbone.prompt_template, tiny_backbone.text_template)
    pairs = [[("what color is the circle? The answer is:", "red"), ("a photo of", "a small red circle")],
             [("how many objects are there? The answer is:", "two"), ("what shape?", "blue square")]]
    lead = [("a photo of", "a small red circle and a large blue square and a small green cross"),
            ("a photo of", "a large yellow diamond")] if with_lead else None
    with torch.no_grad():
        sets = continuation_logits(tiny_backbone.model, tiny_backbone.processor, spec, templates,
                                   tiny_images, pairs, lead=lead).sets
        assert len(sets) == (2 if with_lead else 1)
        flat = [(image, pair) for image, image_pairs in zip(tiny_images, pairs) for pair in image_pairs]
        _assert_rows_match(tiny_backbone, tiny_images, flat, *sets[0])
        if with_lead:
            _assert_rows_match(tiny_backbone, tiny_images, list(zip(tiny_images, lead)), *sets[1])


def test_patch_labels_cover_objects():
    scene = generate_scene(np.random.default_rng(0), WorldConfig())
    labels = patch_labels(scene, 8, 8)
    covered = sum(((o.box[2] - o.box[0]) // 8) * ((o.box[3] - o.box[1]) // 8) for o in scene.objects)
    assert (labels[0] > 0).sum().item() == covered
    assert ((labels[:3] > 0).sum(0) % 3 == 0).all()  # colour, shape and size labelled together
    rows, cols = labels[3].view(8, 8), labels[4].view(8, 8)
    assert (rows[:, 0] == torch.arange(8)).all() and (rows[2] == 2).all()
    assert (cols[0] == torch.arange(8)).all() and (cols[:, 5] == 5).all()


def test_family_weights_skew_the_draw_among_feasible_families():
    rng = np.random.default_rng(0)
    scenes = [generate_scene(rng, WorldConfig()) for _ in range(200)]
    assert all(pick_family(s, rng, None) is None for s in scenes[:3])  # uniform: sample_question decides
    weights = {f: 0.0 for f in VQA_FAMILIES} | {"exists": 3.0, "count": 1.0}
    picks = [pick_family(s, rng, weights) for s in scenes]
    assert set(picks) == {"exists", "count"}  # count and exists can always be asked
    assert 0.65 < picks.count("exists") / len(picks) < 0.85
    only_position = {"position": 1.0}
    lone = next(s for s in scenes if "position" not in feasible_families(s))
    with pytest.raises(ValueError, match="leave none"):
        pick_family(lone, rng, only_position)


def test_hard_negatives_bind_colour_to_a_present_shape_and_keep_yes_no_balanced():
    rng = np.random.default_rng(0)
    scenes = [generate_scene(rng, WorldConfig()) for _ in range(300)]
    for scene in scenes[:50]:
        question = hard_negative(scene, rng)
        color, shape = question.slots["color"], question.slots["shape"]
        assert question.answer == "no" and evaluate(scene, "exists", question.slots) == ("no", None)
        assert any(o.shape == shape for o in scene.objects) and (color, shape) not in {
            (o.color, o.shape) for o in scene.objects}
        assert question.template in {t.key for t in family_templates("exists", TRAIN)}
    exists = {f: 0.0 for f in VQA_FAMILIES} | {"exists": 1.0}
    draws = [training_question(s, rng, exists, hard_negatives=1.0) for s in scenes]
    noes = [(s, q) for s, q in zip(scenes, draws) if q.answer == "no"]
    assert 0.4 < len(noes) / len(draws) < 0.6  # only "no" questions are re-asked
    assert all(any(o.shape == q.slots["shape"] for o in s.objects) for s, q in noes)
    # At 0 the draw is sample_question's own, with no extra random number: older recipes keep their data.
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for scene in scenes[:20]:
        assert training_question(scene, a, exists) == sample_question(scene, b, pick_family(scene, b, exists))


def test_existence_pairs_differ_in_the_colour_word_only():
    rng = np.random.default_rng(1)
    triple = ("blue", "yellow", "purple")
    found = 0
    for _ in range(300):
        scene = generate_scene(rng, WorldConfig())
        pair = existence_pair(scene, rng, triple)
        present = [(o.color, o.shape) for o in scene.objects]
        if pair is None:  # no object of those colours whose shape is missing in another of them
            assert not any(c in triple and present.count((c, s)) == 1 and any((a, s) not in present for a in triple)
                           for c, s in present)
            continue
        found += 1
        no, yes = pair
        assert (no.answer, yes.answer) == ("no", "yes") and no.template == yes.template
        assert no.slots["shape"] == yes.slots["shape"] and no.slots["color"] != yes.slots["color"]
        assert {no.slots["color"], yes.slots["color"]} <= set(triple)
        assert evaluate(scene, "exists", no.slots) == ("no", None)
        assert scene.objects[yes.target].color == yes.slots["color"]
        assert no.template in {t.key for t in family_templates("exists", TRAIN)}
    assert found > 50


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


def test_object_curriculum_limits_by_nominal_step():
    stage = Stage("language", "language", 900, 5e-4, {"x": 1.0}, max_objects=((200, 1), (500, 2)))
    assert [stage.object_limit(s) for s in (0, 199, 200, 499, 500, 899)] == [1, 1, 2, 2, None, None]
    assert Stage("v", "vision", 10, 1e-3, {"x": 1.0}).object_limit(0) is None


def test_target_cells_are_the_boxes_patches_row_major():
    assert target_cells((8, 16, 24, 40), grid=8, patch=8) == [17, 18, 25, 26, 33, 34]
    assert target_cells((0, 0, 64, 64), grid=8, patch=8) == list(range(64))
    # On a coarser grid (a laid-out Q-Former's 4 x 4 queries over 16-px blocks): every block it touches.
    assert target_cells((8, 8, 24, 24), grid=4, patch=16) == [0, 1, 4, 5]
    assert target_cells((16, 0, 32, 16), grid=4, patch=16) == [1]


def test_object_attention_loss_equals_a_loop_over_rows_and_layers():
    rng = torch.Generator().manual_seed(0)
    image_token, prefix_len, cont_len, heads = 7, 6, 5, 3
    prefix_ids = torch.tensor([[1, 7, 7, 7, 7, 2]] * 2)  # a 2 x 2 grid of image tokens at positions 1-4
    attentions = {k: torch.rand(4, heads, cont_len, prefix_len + cont_len, generator=rng).softmax(-1)
                  for k in (0, 2)}
    labels = torch.full((4, cont_len), IGNORE)
    for row, first in enumerate((2, 3, 1, 4)):
        labels[row, first:] = 5  # the answer's first token sits at `first`, predicted from first - 1
    cells = [[0, 1], None, [3], [2, 3]]
    expected = []
    for weights in attentions.values():
        for row, target in enumerate(cells):
            if target is None:
                continue
            first = int((labels[row] != IGNORE).nonzero()[0])
            looks = weights[row, :, first - 1, 1:5].sum(0)  # heads summed, image tokens only
            expected.append(-torch.log(looks[target].sum() / looks.sum() + 1e-6))
    looks = answer_looks(labels, cells)
    assert [(k.row, k.at) for k in looks] == [(0, 1), (2, 0), (3, 3)]
    got = object_attention_loss(attentions, prefix_ids, image_token, looks)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-6)
    assert object_attention_loss(attentions, prefix_ids, image_token, []).item() == 0.0
    # Looks from any positions, several per row.
    looks = [Look(0, 0, [0, 1]), Look(0, 4, [2]), Look(3, 2, [1, 2, 3])]
    expected = [-torch.log(seen[look.cells].sum() / seen.sum() + 1e-6)
                for weights in attentions.values() for look in looks
                for seen in [weights[look.row, :, look.at, 1:5].sum(0)]]
    got = object_attention_loss(attentions, prefix_ids, image_token, looks)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-6)
    # Through a spread of each image token over 9 cells (a Q-Former's queries over patches): an image
    # token counts by the share of it on the look's cells.
    through = torch.rand(len(looks), 4, 9, generator=rng).softmax(-1)
    expected = [-torch.log((seen * through[k][:, look.cells].sum(-1)).sum() / seen.sum() + 1e-6)
                for weights in attentions.values() for k, look in enumerate(looks)
                for seen in [weights[look.row, :, look.at, 1:5].sum(0)]]
    got = object_attention_loss(attentions, prefix_ids, image_token, looks, through)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-6)
    # A one-hot spread (token k on cell k) is the plain loss.
    one_hot = torch.eye(4).expand(len(looks), 4, 4)
    assert torch.allclose(object_attention_loss(attentions, prefix_ids, image_token, looks, one_hot),
                          object_attention_loss(attentions, prefix_ids, image_token, looks), atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        object_attention_loss(attentions, prefix_ids, image_token, looks, through[:, :3])


def test_query_spread_is_each_querys_attention_over_the_patches():
    weights = torch.rand(2, 3, 4, 10, generator=torch.Generator().manual_seed(1)).softmax(-1)  # CLS + 9 patches
    spread = query_spread(weights, has_cls=True)
    assert spread.shape == (2, 4, 9)
    assert torch.allclose(spread.sum(-1), torch.ones(2, 4), atol=1e-6)
    summed = weights[1, :, 2, 1:].sum(0)
    assert torch.allclose(spread[1, 2], summed / summed.sum(), atol=1e-6)
    assert torch.allclose(query_spread(weights[..., 1:], has_cls=False), spread, atol=1e-6)


def test_direction_looks_send_each_direction_word_to_its_half(tiny_dirs):
    backbone = load_backbone("llava", tiny_dirs["llava"])
    tokenizer = backbone.processor.tokenizer
    templates = Templates(backbone.prompt_template, backbone.text_template)
    top, left = set(range(32)), {r * 8 + c for r in range(8) for c in range(4)}
    for template in family_templates("position", TRAIN):
        for region, halves in (("top left", [("top", top), ("left", left)]), ("left half", [("left", left)])):
            question = Question("position", template.fill({"region": region}), "circle", 0, {"region": region})
            prompt = PROMPTS["vqa"].format(src=question.text)
            looks = direction_looks(tokenizer, templates, prompt, question, row=5, grid=8, image_size=64)
            row = tokenizer(split_prompt(templates, prompt), add_special_tokens=False).input_ids
            assert [(k.row, set(k.cells)) for k in looks] == [(5, cells) for _, cells in halves]
            for look, (word, _) in zip(looks, halves):  # the word's last token (a word may be several)
                assert tokenizer.decode(row[: look.at + 1]).endswith(word)
    count = Question("count", "How many objects are there?", "two", None, {})
    assert direction_looks(tokenizer, templates, PROMPTS["vqa"].format(src=count.text), count, 0, 8, 64) == []


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


def test_layout_cells_tile_the_patch_grid_in_row_major_blocks():
    cells = layout_cells(16, 8)
    assert cells[0] == [0, 1, 8, 9] and cells[5] == [18, 19, 26, 27] and cells[15] == [54, 55, 62, 63]
    assert sorted(c for block in cells for c in block) == list(range(64))
    assert layout_cells(4, 4) == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(ValueError, match="tile"):
        layout_cells(12, 8)
    with pytest.raises(ValueError, match="tile"):
        layout_cells(9, 8)


def test_layout_loss_equals_a_loop_over_images_and_queries():
    rng = torch.Generator().manual_seed(0)
    weights = torch.rand(3, 2, 4, 17, generator=rng).softmax(-1)  # CLS + a 4 x 4 patch grid
    cells = layout_cells(4, 4)
    expected = []
    for image in range(3):
        for query, block in enumerate(cells):
            seen = weights[image, :, query].sum(0)
            expected.append(-torch.log(seen[[c + 1 for c in block]].sum() / seen.sum() + 1e-6))
    assert torch.allclose(layout_loss(weights, cells, has_cls=True), torch.stack(expected).mean(), atol=1e-6)
    # Without CLS the keys are the patches themselves.
    no_cls = weights[..., 1:]
    expected = [-torch.log(no_cls[i, :, q].sum(0)[block].sum() / no_cls[i, :, q].sum() + 1e-6)
                for i in range(3) for q, block in enumerate(cells)]
    assert torch.allclose(layout_loss(no_cls, cells, has_cls=False), torch.stack(expected).mean(), atol=1e-6)
    # Attention all on each query's own block: no loss.
    exact = torch.zeros(1, 1, 4, 17)
    for query, block in enumerate(cells):
        exact[0, 0, query, [c + 1 for c in block]] = 0.25
    assert layout_loss(exact, cells, has_cls=True).item() < 1e-5
    with pytest.raises(ValueError, match="query tokens"):
        layout_loss(weights, layout_cells(16, 8), has_cls=True)


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
