"""Where text positions should look in the image, and the attention and layout terms (against loops)."""
from __future__ import annotations

import pytest
import torch

from attrib.backbones.loader import load_backbone
from attrib.defaults.batches import (
    IGNORE,
    Templates,
    split_prompt,
)
from attrib.defaults.looks import (
    Look,
    answer_looks,
    direction_looks,
    layout_cells,
    layout_loss,
    object_attention_loss,
    query_spread,
    target_cells,
)
from attrib.defaults.recipe import PROMPTS
from attrib.world.questions import Question
from attrib.world.templates import TRAIN
from attrib.world.templates import templates as family_templates


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


