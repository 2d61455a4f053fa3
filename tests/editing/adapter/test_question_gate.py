"""The question gate: which tokens make a row's question, a key that does not see a scored answer, the
meaning groups, a fit that parts rephrases from other questions, and in an editor an edit that acts on its
own question only while another question about the edit image stays bit-identical."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from editing.adapter.output_write import OutputWriteConfig
from editing.adapter.question_gate import (
    QuestionEncoder,
    QuestionGateConfig,
    choose_question_threshold,
    closing_marker,
    fit_question_encoder,
    meaning_groups,
    prompt_ids,
)
from editing.adapter.vead import VeadConfig
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch
from tests.editing.conftest import SMALL

FORMAT = "{src} the answer is:"
PROMPT = FORMAT.format(src="what color is the circle?")
OTHER = FORMAT.format(src="how many squares are there?")
GATED = VeadConfig(**{**SMALL.to_json(), "scene_gate": True, "scene_similarity": "chamfer"})


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]


def test_the_question_is_the_tokens_before_the_last_marker_without_padding_or_image_tokens():
    gate = QuestionEncoder(8, QuestionGateConfig(hidden=8, dim=4), marker_length=2)
    gate.set_tokens([7, 8], pad_id=0, image_token_id=9)
    ids = torch.tensor([[0, 0, 9, 9, 3, 4, 7, 8],  # padded prompt: 3 4 then the marker
                        [9, 9, 3, 7, 8, 5, 7, 8],  # the marker twice: the last one closes the prompt
                        [9, 9, 3, 4, 7, 8, 5, 6],  # a scored answer (5 6) after the marker
                        [0, 9, 9, 3, 4, 5, 6, 2]])  # no marker: every token that is not special
    expected = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0, 0, 0, 0],
                             [0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(gate.question_mask(ids), expected)


def test_meaning_groups_join_pairs_transitively():
    groups = meaning_groups([("a", "b"), ("c", "d"), ("b", "e")])
    assert groups["a"] == groups["b"] == groups["e"] != groups["c"] == groups["d"]


def test_a_row_has_the_same_key_whether_its_answer_is_scored_or_generated(tiny_backbone, images):
    marker = closing_marker(tiny_backbone, FORMAT)
    assert "answer is:" in tiny_backbone.tokenizer.decode(marker)
    embed = tiny_backbone.module(tiny_backbone.spec.embed_tokens)
    torch.manual_seed(0)
    gate = QuestionEncoder(embed.weight.shape[1], QuestionGateConfig(hidden=16, dim=8), len(marker))
    gate.set_tokens(marker, tiny_backbone.tokenizer.pad_token_id, tiny_backbone.image_token_id)
    batch = teacher_forced_batch(tiny_backbone, images, [PROMPT, OTHER], ["red", "two squares"])
    with torch.no_grad():
        scored = gate.keys(batch.inputs["input_ids"], embed)
        alone = torch.cat([gate.keys(prompt_ids(tiny_backbone, p)[None], embed) for p in (PROMPT, OTHER)])
    torch.testing.assert_close(scored, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(scored[0], scored[1], rtol=0, atol=1e-3)


def test_the_fit_parts_rephrases_from_same_image_questions():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(40, 16)
    # token 0 opens every prompt; 1-3 template words; 10+ objects and 20+ families
    def q(template, family, obj):
        return torch.tensor([0, template, 20 + family, 10 + obj, 30])
    tokens, triples = {}, []
    for obj in range(6):
        for family in range(3):
            src, rephrase = f"{family}-{obj}-a", f"{family}-{obj}-b"
            tokens[src], tokens[rephrase] = q(1, family, obj), q(2, family, obj)
            others = [f"{(family + 1) % 3}-{obj}-a", f"{family}-{(obj + 1) % 6}-a"]
            triples.append((src, rephrase, others))
    gate = QuestionEncoder(16, QuestionGateConfig(hidden=32, dim=16, epochs=60, batch_size=8), marker_length=1)
    gate.set_tokens([30], pad_id=None, image_token_id=None)
    losses = fit_question_encoder(gate, embed, tokens, triples)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        keys = {s: gate.keys(t[None], embed)[0] for s, t in tokens.items()}
    report = choose_question_threshold(gate, keys, triples)
    assert report["dev_rephrase_kept"] == 100.0 and report["dev_same_image_turned_away"] == 100.0
    assert report["threshold"] == pytest.approx(float(gate.threshold), abs=1e-4)


def _gated_editor(make_editor, backbone, **kwargs):
    editor = make_editor(backbone, -1, GATED, **kwargs)
    with torch.no_grad():  # the gate opens for the edit's own image only
        editor.adapter.scene.log_scale.fill_(math.log(1000.0))
        editor.adapter.scene.threshold.fill_(0.999)
        for p in editor.adapter.parameters():  # an adapter that visibly changes what it touches
            if p.dim() > 1:
                p.add_(0.5 * torch.randn_like(p))
    marker = closing_marker(backbone, FORMAT)
    embed = editor.hook.embed
    torch.manual_seed(1)
    gate = QuestionEncoder(embed.weight.shape[1], QuestionGateConfig(hidden=16, dim=8), len(marker))
    gate.set_tokens(marker, backbone.tokenizer.pad_token_id, backbone.image_token_id)
    with torch.no_grad():  # a threshold halfway between the two prompts' cosine and 1
        own, other = (gate.keys(prompt_ids(backbone, p)[None], embed)[0] for p in (PROMPT, OTHER))
    cos = float(own @ other)
    assert cos < 1 - 1e-4
    gate.threshold.fill_((1 + cos) / 2)
    editor.hook.question_gate = gate
    return editor


def _logits(backbone, image, prompt, target):
    batch = teacher_forced_batch(backbone, [image], [prompt], [target])
    with torch.no_grad():
        return backbone.forward(batch.inputs, use_cache=False).logits


def test_an_edit_acts_on_its_question_only(tiny_backbone, images, make_editor):
    editor = _gated_editor(make_editor, tiny_backbone)
    before = {name: _logits(tiny_backbone, *row) for name, row in
              {"own": (images[0], PROMPT, "blue"), "other": (images[0], OTHER, "two"),
               "image": (images[1], PROMPT, "blue")}.items()}
    editor.edit(EditRequest(images[0], PROMPT, "blue"))
    assert editor.hook.bank.question_keys() is not None
    assert not torch.equal(_logits(tiny_backbone, images[0], PROMPT, "blue"), before["own"])
    threshold = float(editor.hook.question_gate.threshold)
    assert float(editor.hook.last_question_cos[0]) >= threshold
    other = _logits(tiny_backbone, images[0], OTHER, "two")
    assert float(editor.hook.last_question_cos[0]) < threshold
    assert torch.equal(other, before["other"])  # same image, other question
    assert torch.equal(_logits(tiny_backbone, images[1], PROMPT, "blue"), before["image"])  # not routed
    editor.hook.question_gate = None  # without the gate the other question about the edit image changes
    assert not torch.equal(_logits(tiny_backbone, images[0], OTHER, "two"), before["other"])
    editor.restore()
    assert editor.hook.bank.questions == [] and editor.hook.bank.question_keys() is None
    assert torch.equal(_logits(tiny_backbone, images[0], PROMPT, "blue"), before["own"])


def test_the_output_write_still_fires_on_the_edits_own_question(tiny_backbone, images, make_editor):
    editor = _gated_editor(make_editor, tiny_backbone, output_write=OutputWriteConfig(margin=2.0, tau=None))
    target = "green blue yes"
    other = _logits(tiny_backbone, images[0], OTHER, target)
    editor.edit(EditRequest(images[0], PROMPT, target))
    assert len(editor.hook.bank.writes) == 1
    batch = teacher_forced_batch(tiny_backbone, [images[0]], [PROMPT], [target])
    with torch.no_grad():
        logits = tiny_backbone.forward(batch.inputs, use_cache=False).logits
    assert torch.equal(batch.answer_logits(logits, 0).argmax(-1), batch.labels(0))
    # without the key check the write would fire on any routed row; the question gate keeps this one out
    assert torch.equal(_logits(tiny_backbone, images[0], OTHER, target), other)
