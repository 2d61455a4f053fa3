"""Per-record products and the IM alignment inputs: targets from the right image (the official slice bug)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attrib.backbones.loader import load_backbone
from attrib.data import load_records
from attrib.prompts import load_prompts
from editing.adapter.visedit import EditPlacement
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch
from editing.training.config import TrainConfig
from editing.training.examples import ROLES, answer_positions, example_rows, stack_signals, token_influence
from editing.training.trainer import Trainer, im_inputs


def test_answer_positions():
    select, mask = answer_positions([1, 3], 10)
    assert select.tolist() == [[8, 8, 8], [6, 7, 8]] and mask.tolist() == [[True, False, False], [True] * 3]


def test_products_and_signal_stacking(llava, tiny_world, make_editor):
    records = load_records(tiny_world / "vqa_train.json")
    editor = make_editor(llava, EditPlacement(0, (1,), 1))
    trainer = Trainer(editor, records, TrainConfig(batch_size=2, influence_draws=1))
    first, again = trainer.store.get(0), trainer.store.compute(0)
    assert torch.equal(first.influence, again.influence) and torch.equal(first.pre_loc, again.pre_loc)
    assert first.influence.shape == (3, llava.n_visual_tokens) and first.pre_loc.shape[-1] == len(llava.tokenizer)
    second = trainer.store.get(1)
    stacked = stack_signals([first.signal, second.signal], [1, 0, 1])
    assert stacked.states.shape[0] == 3 and torch.equal(stacked.query[1], first.signal.query[0])
    length = second.signal.states.shape[1]
    assert torch.equal(stacked.states[0, :length], second.signal.states[0]) and stacked.mask[0].sum() == length


def test_alignment_targets_come_from_the_right_image(llava, tiny_world, make_editor):
    """A batch whose image-rephrase rows show another image than their reliability rows: the IM sees the
    image-rephrase states and is aligned to the image-rephrase influence. The official bug
    (``hidden_states[:, a, b]`` for ``[:, a:b]``) gave these rows the reliability image's influence."""
    records = load_records(tiny_world / "vqa_train.json")
    editor = make_editor(llava, EditPlacement(0, (1,), 1))
    trainer = Trainer(editor, records, TrainConfig(batch_size=2, influence_draws=2))
    rows = [example_rows(r, "vqa", load_prompts()) for r in records[:2]]
    products = [trainer.store.get(j) for j in range(2)]
    noise = trainer.store.noise
    own, buggy = [], []
    for j in range(2):
        image_rephrase, prompt, _ = rows[j]["m_gen"]
        own.append(token_influence(llava, [image_rephrase], [prompt], [1], noise, [(j, 2)])[0])
        buggy.append(token_influence(llava, [rows[j]["rel"][0]], [prompt], [1], noise, [(j, 2)])[0])
        # the store computes a chunk of records in one padded batch: equal up to float rounding
        assert torch.allclose(products[j].influence[2], own[j], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(own[j], buggy[j], rtol=1e-3, atol=0)

    images, prompts, targets = zip(*[rows[j][role] for role in ROLES for j in range(2)])
    site = trainer.split.prefix(teacher_forced_batch(llava, images, prompts, targets).inputs)
    tokens = torch.tensor([[0, 3, 5], [1, 2, 4]])
    influence = torch.stack([p.influence[2] for p in products])
    shown, unrelated, aligned = im_inputs(site, influence, torch.tensor([2, 2]), tokens)
    for j in range(2):
        image_rephrase, prompt, target = rows[j]["m_gen"]
        alone = trainer.split.prefix(teacher_forced_batch(llava, [image_rephrase], [prompt], [target]).inputs)
        assert torch.allclose(shown[j], alone.hidden[0, alone.positions[0, tokens[j]]], atol=1e-5)
        rel = site.hidden[j, site.positions[j, tokens[j]]]  # the same tokens of the reliability row
        assert not torch.allclose(shown[j], rel, atol=1e-3)
        expected = own[j][tokens[j]].clamp(min=0)
        assert torch.allclose(aligned[j], expected / expected.sum(), rtol=1e-3)
        wrong = buggy[j][tokens[j]].clamp(min=0)
        assert not torch.allclose(aligned[j], wrong / wrong.sum(), atol=1e-4)
        m_loc = site.hidden[3 * 2 + j, site.positions[3 * 2 + j, tokens[j]]]
        assert torch.equal(unrelated[j], m_loc)


def test_chunked_products_do_not_depend_on_access_order(llava, tiny_world, make_editor):
    """Parts are computed per fixed chunk of records in one padded batch: the same values whichever
    record asks first, and equal (to float rounding) to one record at a time."""
    records = load_records(tiny_world / "vqa_train.json") + load_records(tiny_world / "vqa_eval.json")  # 5
    editor = make_editor(llava, EditPlacement(0, (1,), 1))
    config = TrainConfig(batch_size=2, influence_draws=1, product_chunk=2)
    later_first, in_order = Trainer(editor, records, config).store, Trainer(editor, records, config).store
    assert later_first.members(3) == [2, 3] and later_first.members(4) == [4]
    later_first.get(3)  # record 3 asks first here, record 2 first in in_order: same chunk either way
    in_order.get(2)
    a, b = later_first.get(3), in_order.get(3)
    assert torch.equal(a.influence, b.influence) and torch.equal(a.pre_loc, b.pre_loc)
    assert torch.equal(a.signal.states, b.signal.states) and torch.equal(a.signal.query, b.signal.query)
    single = Trainer(editor, records, replace(config, product_chunk=1)).store.get(3)
    assert torch.allclose(a.influence, single.influence, rtol=1e-3, atol=1e-6)
    assert torch.allclose(a.pre_loc, single.pre_loc, atol=1e-4)
    assert a.signal.states.shape == single.signal.states.shape  # the batch's left padding is trimmed
    assert torch.allclose(a.signal.states, single.signal.states, atol=1e-4)
    assert int(a.signal.prompt_end) == int(single.signal.prompt_end)


def test_influence_is_chunked_in_the_order_steps_ask_for_it(llava, tiny_world, make_editor):
    """Influence chunks hold the (record, sample) pairs in first-use order, so training computes only the
    pairs its steps draw (plus the rest of the last chunk); values match a one-pair chunk."""
    records = load_records(tiny_world / "vqa_train.json") + load_records(tiny_world / "vqa_eval.json")  # 5
    editor = make_editor(llava, EditPlacement(0, (1,), 1))
    config = TrainConfig(batch_size=2, influence_draws=1, product_chunk=2)
    trainer = Trainer(editor, records, config)
    asked = [(i, int(r)) for s in range(1, 5) for i, r in zip(trainer.batch_indices(s), trainer.im_roles(s, 2))]
    first_use = list(dict.fromkeys(asked))
    assert trainer.store.pair_members(*first_use[2]) == first_use[2:4]
    for step in range(1, 3):
        trainer.step(step)
    drawn = list(dict.fromkeys(asked[:4]))
    computed = [(key[0], key[2]) for key in trainer.store._kept if key[1] == "influence"]
    assert sorted(computed) == sorted(first_use[:len(drawn) + len(drawn) % 2])
    never = next((i, r) for i in range(5) for r in range(3) if (i, r) not in first_use)
    assert never in trainer.store.pair_members(*never)  # a pair the order reaches late still gets a chunk
    single = Trainer(editor, records, replace(config, product_chunk=1)).store
    for i, r in first_use[:3]:
        assert torch.allclose(trainer.store.influence(i, r), single.influence(i, r), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["llava", "blip2"])
def test_stored_signals_equal_the_records_own_signal_wherever_the_padding_went(name, tiny_dirs, tiny_world,
                                                                                make_editor):
    """Signals are computed for a chunk of records in one padded batch; each must equal the record's own
    unpadded ``edit_signal``. BLIP-2's processor pads between the query tokens and the text, so cutting
    the first ``pad`` tokens (right for left padding) would drop query tokens and keep padding."""
    backbone = load_backbone(name, tiny_dirs[name])
    records = load_records(tiny_world / "vqa_train.json")
    records = [records[0], replace(records[1], fields={**records[1].fields,
                                                       "src": records[1].src + " Look closely at the whole picture"})]
    editor = make_editor(backbone, EditPlacement(-1, (0,), 0))
    trainer = Trainer(editor, records, TrainConfig(batch_size=2, influence_draws=1))
    formats = load_prompts()
    for index, record in enumerate(records):
        stored = trainer.store.signal(index)
        rows = example_rows(record, "vqa", formats)
        own = editor.edit_signal(EditRequest(*rows["rel"]))
        assert stored.mask.all() and torch.equal(stored.states, own.states)  # LM input: exact
        torch.testing.assert_close(stored.query, own.query, rtol=1e-5, atol=1e-5)  # after layer 0: padded batch
        assert torch.equal(stored.prompt_end, own.prompt_end)
        assert torch.equal(stored.visual, own.visual)


def test_the_same_image_row_asks_the_records_first_same_image_question_on_its_own_image(tiny_world):
    from attrib.data import load_records
    from attrib.prompts import load_prompts
    from editing.training.examples import example_row, has_same_image

    record = load_records(tiny_world / "vqa_train.json")[0]
    assert has_same_image(record)
    image, prompt, target = example_row(record, "same_image", "vqa", load_prompts())
    question = record.truth["same_image"][0]
    assert prompt == load_prompts()["m_loc"].format(m_loc_q=question["question"]) and target == question["answer"]
    assert image.tobytes() == record.load_image("image").tobytes()
