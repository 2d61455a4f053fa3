"""The output write: its fit reaches the margin and leaves reached positions alone, the batched write equals
the row-by-row one, and in an editor it makes the edit sample answer a target the adapter cannot reach while
other images, text-only inputs and (with the key check) other questions stay unedited; cached generation
writes token by token; restore is bit-exact."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from editing.adapter.output_write import (
    OutputWrite,
    OutputWriteConfig,
    OutputWrites,
    fit_output_write,
    histories,
    margins,
)
from editing.adapter.vead import VeadConfig
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch
from tests.editing.conftest import SMALL

PROMPT = "what color is the circle?"
OTHER = "how many squares are there?"
GATED = VeadConfig(**{**SMALL.to_json(), "scene_gate": True, "scene_similarity": "chamfer"})


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]


def test_the_fit_reaches_the_margin_and_skips_reached_positions():
    torch.manual_seed(0)
    weight, hidden = torch.randn(50, 16), torch.randn(3, 16)
    targets = torch.tensor([4, 9, 17])
    targets[1] = (hidden[1] @ weight.T).argmax()  # already the top token ...
    weight[targets[1]] += 10 * hidden[1] / hidden[1].norm()  # ... by a wide margin
    config = OutputWriteConfig(margin=3.0, steps=500)
    write = fit_output_write(hidden, targets, torch.tensor([1, 4, 9]), weight, None, config)
    reached = margins((hidden + write.deltas) @ weight.T, targets)
    assert (reached >= 3.0).all() and 0 < write.steps < 500 and write.reached
    assert torch.equal(write.deltas[1], torch.zeros(16)) and write.deltas[0].abs().sum() > 0
    torch.testing.assert_close(write.keys.norm(dim=-1), torch.ones(3))


def test_a_fit_out_of_steps_says_it_fell_short_of_the_margin():
    """Adam moves each coordinate by about ``lr`` a step, so a far margin at a small lr is not reached in
    a few steps, and the write says so (the toy defaults' novel targets, at lr 0.05 and 200 steps, reached
    a lead of 3–5 logits against a margin of 40)."""
    torch.manual_seed(0)
    weight, hidden, targets = torch.randn(50, 16), torch.randn(3, 16), torch.tensor([4, 9, 17])
    short = fit_output_write(hidden, targets, torch.tensor([1, 4, 9]), weight, None,
                             OutputWriteConfig(margin=40.0, steps=20, lr=0.05))
    gap = margins((hidden + short.deltas) @ weight.T, targets)
    assert not short.reached and short.steps == 20 and bool((gap < 40.0).any())
    full = fit_output_write(hidden, targets, torch.tensor([1, 4, 9]), weight, None,
                            OutputWriteConfig(margin=40.0, steps=2000, lr=0.5))
    assert full.reached and bool((margins((hidden + full.deltas) @ weight.T, targets) >= 40.0).all())


def test_histories_are_the_tokens_before_each_position():
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]])
    got = histories(ids, 1, 3, 3, pad=-2)
    for row in range(2):
        for i in range(3):
            p = 1 + i
            expected = [int(ids[row, p - 1 - j]) if p - 1 - j >= 0 else -2 for j in range(3)]
            assert got[row, i].tolist() == expected
    assert histories(ids[0], 0, 5, 0).shape == (5, 0)


def _agreeing_run(write, ids, position, k):
    """How many tokens before ``position`` of ``ids`` [S] equal key k's history, nearest first."""
    run = 0
    for j in range(0 if write.history is None else write.history.shape[1]):
        if position - 1 - j < 0 or int(ids[position - 1 - j]) != int(write.history[k, j]):
            break
        run += 1
    return run


def _expected_write(writes, hidden, ids, routed, fire, tau):
    """The write one position at a time: of the keys whose trigger is the position's token (and whose cosine
    reaches tau), the one with the longest run of agreeing history tokens, then the closest, writes."""
    expected, length, several = hidden.clone(), hidden.shape[1], 0
    offset = ids.shape[1] - length
    for row in range(hidden.shape[0]):
        write = writes.items[int(routed[row])]
        if not fire[row] or write is None:
            continue
        for t in range(length):
            position = offset + t
            cosines = [float(F.cosine_similarity(hidden[row, t], key, dim=0)) for key in write.keys]
            matching = [k for k in range(len(write.triggers)) if ids[row, position] == write.triggers[k]
                        and write.deltas[k].abs().sum() > 0 and (tau is None or cosines[k] >= tau)]
            several += len(matching) > 1
            if matching:
                runs = [_agreeing_run(write, ids[row], position, k) for k in range(len(write.triggers))]
                expected[row, t] += write.deltas[max(matching, key=lambda k: (runs[k], cosines[k]))]
    return expected, several


def test_the_batched_write_equals_the_row_by_row_one():
    torch.manual_seed(1)
    d, writes = 8, OutputWrites()
    for k in (2, 3, 1):
        writes.append(OutputWrite(torch.randint(0, 6, (k,)), F.normalize(torch.randn(k, d), dim=-1), torch.randn(k, d)))
    writes.append(None)
    writes.items[1].triggers[2] = writes.items[1].triggers[0]  # a target that repeats a token
    hidden, ids = torch.randn(4, 7, d), torch.randint(0, 6, (4, 7))
    hidden[0, 3] = writes.items[0].keys[1] * 2  # a position whose state is its key
    ids[0, 3] = writes.items[0].triggers[1]
    ids[1, 2] = ids[1, 5] = writes.items[1].triggers[0]  # positions that match two keys of edit 1
    hidden[1, 5] = writes.items[1].keys[2]
    routed, fire = torch.tensor([0, 1, 2, 0]), torch.tensor([True, True, True, False])
    several = 0
    for tau in (None, 0.5):
        expected, counted = _expected_write(writes, hidden, ids, routed, fire, tau)
        several += counted
        torch.testing.assert_close(writes.apply(hidden, ids, routed, fire, tau), expected, rtol=0, atol=1e-6)
    assert several >= 2
    assert torch.equal(writes.apply(hidden, ids, routed, torch.zeros(4, dtype=torch.bool), None), hidden)


def test_the_tokens_before_a_repeated_trigger_choose_its_key():
    """With histories, of several keys on one trigger token the one whose history agrees longest with the
    tokens before the position writes, even where another key is closer; without, the closest; the
    batched write equals the row-by-row one, also when ``hidden`` holds only the last positions."""
    torch.manual_seed(2)
    d, writes = 8, OutputWrites()
    triggers = torch.tensor([3, 1, 3, 2, 3])  # token 3 three times, after 9 / after 1 / after 1, 2
    history = torch.tensor([[9, 8], [3, 9], [1, 3], [3, 1], [2, 3]])
    writes.append(OutputWrite(triggers, F.normalize(torch.randn(5, d), dim=-1), torch.randn(5, d), history=history))
    writes.append(OutputWrite(torch.tensor([3, 3]), F.normalize(torch.randn(2, d), dim=-1), torch.randn(2, d)))
    ids = torch.tensor([[4, 9, 3, 1, 3, 2, 3], [7, 1, 3, 5, 3, 0, 3], [9, 9, 3, 3, 1, 3, 3]])
    hidden = torch.randn(3, 7, d)
    hidden[0, 4] = writes.items[0].keys[0]  # the closest key is occurrence 0, the history says occurrence 2
    routed, fire = torch.tensor([0, 0, 1]), torch.ones(3, dtype=torch.bool)
    out = writes.apply(hidden, ids, routed, fire, None)
    torch.testing.assert_close(out[0, 4], hidden[0, 4] + writes.items[0].deltas[2])
    several = 0
    for tau in (None, 0.2):
        expected, counted = _expected_write(writes, hidden, ids, routed, fire, tau)
        several += counted
        torch.testing.assert_close(writes.apply(hidden, ids, routed, fire, tau), expected, rtol=0, atol=1e-6)
        last = writes.apply(hidden[:, -2:], ids, routed, fire, tau)  # a head run on the last positions only
        torch.testing.assert_close(last, expected[:, -2:], rtol=0, atol=1e-6)
    assert several >= 8


def _answer_ids(backbone, image, prompt, target):
    batch = teacher_forced_batch(backbone, [image], [prompt], [target])
    with torch.no_grad():
        logits = backbone.forward(batch.inputs, use_cache=False).logits
    return batch.answer_logits(logits, 0).argmax(-1), batch.labels(0), logits


def _sharp_editor(make_editor, backbone, write):
    editor = make_editor(backbone, -1, GATED, output_write=write)
    with torch.no_grad():  # the gate opens for the edit's own image only (distinct noise images score far lower)
        editor.adapter.scene.log_scale.fill_(math.log(1000.0))
        editor.adapter.scene.threshold.fill_(0.999)
    return editor


def test_an_edit_with_its_write_answers_its_target_and_nothing_else_changes(tiny_backbone, images, make_editor):
    editor = _sharp_editor(make_editor, tiny_backbone, OutputWriteConfig(margin=2.0, tau=0.999))
    target = "green blue yes"
    other_image = (images[1], PROMPT, target)
    plain = _answer_ids(tiny_backbone, *other_image)[2]
    editor.edit(EditRequest(images[0], PROMPT, target))
    assert len(editor.hook.bank.writes) == 1
    short = int(not editor.hook.bank.writes.items[0].reached)
    assert editor.edit_report() == {"output_write": {"fitted": 1, "short_of_margin": short}}
    with editor.hook.writes_suspended():
        adapter_only = _answer_ids(tiny_backbone, images[0], PROMPT, target)
    assert not torch.equal(adapter_only[0], adapter_only[1])  # the adapter alone does not reach the target
    predicted, labels, _ = _answer_ids(tiny_backbone, images[0], PROMPT, target)
    assert torch.equal(predicted, labels)
    # another question about the edit image: the adapter's change only (the key check keeps the write off)
    with editor.hook.writes_suspended():
        other_question = _answer_ids(tiny_backbone, images[0], OTHER, "two")[2]
    assert torch.equal(_answer_ids(tiny_backbone, images[0], OTHER, "two")[2], other_question)
    assert torch.equal(_answer_ids(tiny_backbone, *other_image)[2], plain)  # another image: not routed
    text = tiny_backbone.encode(None, [PROMPT])
    with torch.no_grad():
        edited_text = tiny_backbone.forward(text, use_cache=False).logits
    editor.restore()
    with torch.no_grad():
        assert torch.equal(tiny_backbone.forward(text, use_cache=False).logits, edited_text)
    assert torch.equal(_answer_ids(tiny_backbone, *other_image)[2], plain)


def test_cached_generation_writes_every_target_token(tiny_backbone, images, make_editor):
    editor = _sharp_editor(make_editor, tiny_backbone, OutputWriteConfig(margin=4.0, tau=None))
    target = "blue circle yes"
    before = editor.generate([images[0]], [PROMPT], max_new_tokens=3)
    editor.edit(EditRequest(images[0], PROMPT, target))
    predicted, labels, _ = _answer_ids(tiny_backbone, images[0], PROMPT, target)
    assert torch.equal(predicted, labels)
    answer = editor.generate([images[0]], [PROMPT], max_new_tokens=len(labels))
    assert answer[0] == tiny_backbone.tokenizer.decode(labels, skip_special_tokens=True).strip()
    editor.restore()
    assert editor.generate([images[0]], [PROMPT], max_new_tokens=3) == before


def test_a_write_is_fitted_under_its_own_edit_whatever_else_the_bank_holds(tiny_backbone, images, make_editor):
    editor = _sharp_editor(make_editor, tiny_backbone, OutputWriteConfig(margin=2.0))
    request = EditRequest(images[0], PROMPT, "green blue yes")
    editor.edit(request)
    alone = editor.hook.bank.writes.items[0]
    editor.restore()
    assert len(editor.hook.bank.writes) == 0 and editor.hook.bank.writes.items == []
    editor.edit(EditRequest(images[1], PROMPT, "red"))
    editor.edit(EditRequest(images[0], OTHER, "four"))
    editor.edit(request)
    banked = editor.hook.bank.writes.items[2]
    assert editor.hook.signal is None and len(editor.hook.bank) == 3
    assert torch.equal(banked.triggers, alone.triggers) and torch.equal(banked.deltas, alone.deltas)
    assert len(editor.hook.bank.writes) == sum(w.writes for w in editor.hook.bank.writes.items)


def test_a_target_that_repeats_tokens_is_answered_exactly(tiny_backbone, images, make_editor):
    """Repeated target tokens give one trigger several keys; each position takes its closest key's write only."""
    editor = _sharp_editor(make_editor, tiny_backbone, OutputWriteConfig(margin=2.0, tau=0.0))
    target = "blue red blue red blue"
    editor.edit(EditRequest(images[0], PROMPT, target))
    write = editor.hook.bank.writes.items[0]
    assert len(set(write.triggers.tolist())) < len(write.triggers)
    predicted, labels, _ = _answer_ids(tiny_backbone, images[0], PROMPT, target)
    assert torch.equal(predicted, labels)


def test_with_a_context_a_repeating_target_is_answered_and_generated(tiny_backbone, images, make_editor):
    """``context`` 3: each write keeps the 3 tokens before its trigger; teacher-forced and cached generation
    (one token a step, the hook carrying the tokens before it) both give the target exactly."""
    editor = _sharp_editor(make_editor, tiny_backbone, OutputWriteConfig(margin=4.0, tau=None, context=3))
    target = "blue red blue red blue"
    editor.edit(EditRequest(images[0], PROMPT, target))
    write = editor.hook.bank.writes.items[0]
    batch = teacher_forced_batch(tiny_backbone, [images[0]], [PROMPT], [target])
    ids, end, n = batch.inputs["input_ids"][0], int(batch.prompt_ends[0]), batch.target_lengths[0]
    assert write.history.shape == (n, 3) and torch.equal(write.history[:, 0], ids[end - 1:end - 1 + n])
    predicted, labels, _ = _answer_ids(tiny_backbone, images[0], PROMPT, target)
    assert torch.equal(predicted, labels)
    answer = editor.generate([images[0]], [PROMPT], max_new_tokens=len(labels))
    assert answer[0] == tiny_backbone.tokenizer.decode(labels, skip_special_tokens=True).strip()
    # the prompt's ids, then every token fed back one step at a time
    assert torch.equal(editor.hook._sequence[0, -(n - 1):], labels[:n - 1].to(editor.hook._sequence.device))


def test_a_write_fitted_on_the_unedited_state_reaches_the_margin_from_it(tiny_backbone, images, make_editor):
    """``fit_on="unedited"``: keys are the head inputs of the edit sample with the adapter shut, every position
    the unedited model leaves under the margin is written, and the edit sample answers its target."""
    config = OutputWriteConfig(margin=2.0, tau=None, fit_on="unedited", steps=2000, lr=0.5)
    editor = _sharp_editor(make_editor, tiny_backbone, config)
    request = EditRequest(images[0], PROMPT, "green blue yes")
    batch = teacher_forced_batch(tiny_backbone, [request.image], [request.prompt], [request.target])
    head = tiny_backbone.module(tiny_backbone.spec.lm_head)
    captured = {}
    handle = head.register_forward_pre_hook(lambda module, args: captured.__setitem__("h", args[0].detach()))
    with torch.no_grad():
        tiny_backbone.forward(batch.inputs, use_cache=False)
    handle.remove()
    end, n = int(batch.prompt_ends[0]), batch.target_lengths[0]
    unedited = captured["h"][0, end:end + n].float()
    editor.edit(request)
    write = editor.hook.bank.writes.items[0]
    torch.testing.assert_close(write.keys, F.normalize(unedited, dim=-1))
    targets = batch.inputs["input_ids"][0, end + 1:end + 1 + n]
    reached = margins((unedited + write.deltas) @ head.weight.detach().float().T, targets)
    assert bool((reached >= 2.0).all()) and write.steps < 2000, (reached, write.steps)
    predicted, labels, _ = _answer_ids(tiny_backbone, images[0], PROMPT, request.target)
    assert torch.equal(predicted, labels)
    editor.restore()
    with pytest.raises(ValueError, match="fit_on must be"):
        OutputWriteConfig(fit_on="edited")
