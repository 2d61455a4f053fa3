"""IKE on the tiny backbones: the demonstration pool, retrieval, the in-context view every prompt goes
through (image and text-only), the context budget, and the exact restore."""
from __future__ import annotations

import pytest
import torch

from attrib.answers import target_token_ids
from attrib.data import load_records
from attrib.prompts import load_prompts
from editing.editor import EditRequest
from editing.inputs import teacher_forced_batch
from editing.methods import MethodContext, build_method, method_config
from editing.methods.ike import NEW_FACT, IkeEditor, InContextBackbone, demonstrations, embed_texts
from tests.editing.methods.forward import logits

PROMPT = "what color is the circle? The answer is:"
TEXT_PROMPT = "nq question: what is the capital of zorbia?"


@pytest.fixture
def make_ike():
    """``make_ike(backbone, **hyper)``: an IKE editor (config file + ``hyper``); restored at teardown."""
    made = []

    def make(backbone, **hyper) -> IkeEditor:
        config = {**method_config("ike", backbone.spec.name), **hyper}
        editor = build_method("ike", MethodContext(backbone, hyper=config))
        made.append(editor)
        return editor

    yield make
    for editor in made:
        editor.restore()


def test_the_config_loads_with_easyedits_k():
    assert method_config("ike", "blip2")["k"] == 32


def test_prepare_pools_three_demonstrations_per_train_record(tiny_backbone, tiny_world, make_ike):
    train = load_records(tiny_world / "vqa_train.json")
    editor = make_ike(tiny_backbone)
    report = editor.prepare(train, [])
    assert report["pool"] == 3 * len(train) == len(editor.pool) == editor.embeddings.shape[0]
    assert report["steps"] == 0 and report["seconds"] >= 0
    record, formats = train[0], load_prompts()
    fact = f"New Fact: {formats['vqa'].format(src=record.src)} {record.alt}\nPrompt: "
    copy, update, retain = demonstrations(record, formats, "vqa")
    assert copy == f"{fact}{formats['vqa'].format(src=record.src)} {record.alt}\n\n"
    assert update == f"{fact}{formats['vqa'].format(src=record.rephrase)} {record.alt}\n\n"
    assert retain == f"{fact}{formats['loc'].format(loc=record.loc)} {record.loc_ans}\n\n"
    assert torch.allclose(editor.embeddings.norm(dim=-1), torch.ones(len(editor.pool)))


def test_embeddings_do_not_depend_on_batch_padding(tiny_backbone):
    texts = ["New Fact: a b\nPrompt: a b\n\n", "what color is the circle? The answer is: red and blue and red"]
    together = embed_texts(tiny_backbone, texts, batch_size=2)
    alone = torch.cat([embed_texts(tiny_backbone, [text], batch_size=1) for text in texts])
    assert torch.allclose(together, alone, atol=1e-5)


def test_a_train_edit_retrieves_its_own_copy_demonstration_first(tiny_backbone, tiny_world, make_ike):
    train = load_records(tiny_world / "vqa_train.json")
    editor = make_ike(tiny_backbone, k=2)
    editor.prepare(train, [])
    request = EditRequest.from_record(train[1])
    own = f"New Fact: {request.prompt} {request.target}\nPrompt: {request.prompt} {request.target}\n\n"
    hits = editor.retrieve(own)
    assert len(hits) == 2 and editor.pool[hits[0]] == own


def test_every_prompt_gets_the_context_inside_the_template(tiny_backbone, tiny_images, tiny_world, make_ike):
    editor = make_ike(tiny_backbone, k=3)
    editor.prepare(load_records(tiny_world / "vqa_train.json"), [])
    request = EditRequest(tiny_images[0], PROMPT, "blue")
    context = editor.edit(request)
    view = editor.backbone
    assert isinstance(view, InContextBackbone) and view is not tiny_backbone
    assert view.model is tiny_backbone.model and view.processor is tiny_backbone.processor
    assert context.endswith(NEW_FACT.format(fact=PROMPT, target="blue"))
    assert f"New Fact: {PROMPT} blue\nPrompt: {PROMPT} blue\n\n" in context
    assert 0 < editor.demos_used[-1] <= 3
    for with_image in (True, False):  # text-only prompts are edited too (T-Loc)
        plain = tiny_backbone.format_prompt(TEXT_PROMPT, with_image)
        edited = view.format_prompt(TEXT_PROMPT, with_image)
        assert edited == tiny_backbone.format_prompt(context + TEXT_PROMPT, with_image) != plain
    template = tiny_backbone.prompt_template
    if "<image>" in template:  # the image placeholder stays where the template puts it
        assert view.format_prompt(PROMPT).index("<image>") == template.index("<image>")
    # the evaluation's rows and scored target tokens both see the context
    batch = teacher_forced_batch(view, [tiny_images[0]], [PROMPT], ["blue"])
    plain_batch = teacher_forced_batch(tiny_backbone, [tiny_images[0]], [PROMPT], ["blue"])
    assert batch.inputs["input_ids"].shape[1] > plain_batch.inputs["input_ids"].shape[1]
    assert batch.labels(0).tolist() == target_token_ids(view, PROMPT, "blue")
    assert logits(view, None, TEXT_PROMPT).shape[1] > logits(tiny_backbone, None, TEXT_PROMPT).shape[1]


def test_restore_gives_bit_identical_logits_on_image_and_text_inputs(tiny_backbone, tiny_images, tiny_world,
                                                                    make_ike):
    before_image = logits(tiny_backbone, [tiny_images[1]], PROMPT)
    before_text = logits(tiny_backbone, None, TEXT_PROMPT)
    editor = make_ike(tiny_backbone, k=2)
    editor.prepare(load_records(tiny_world / "vqa_train.json"), [])
    editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    assert not torch.equal(logits(editor.backbone, None, TEXT_PROMPT)[:, -1], before_text[:, -1])
    editor.restore()
    assert editor.backbone is tiny_backbone
    assert torch.equal(logits(editor.backbone, [tiny_images[1]], PROMPT), before_image)
    assert torch.equal(logits(editor.backbone, None, TEXT_PROMPT), before_text)


def test_demonstrations_that_do_not_fit_the_positions_are_dropped(tiny_backbone, tiny_images, tiny_world,
                                                                  make_ike):
    editor = make_ike(tiny_backbone, k=6)
    editor.prepare(load_records(tiny_world / "vqa_train.json"), [])
    positions = tiny_backbone.config.text_config.max_position_embeddings
    longest = max(editor.pool_lengths)
    # room for the own demonstration, the new-fact line and about one pool demonstration
    editor.config = type(editor.config)(k=6, reserve_tokens=positions - tiny_backbone.n_visual_tokens
                                        - 3 * longest, batch_size=32)
    context = editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    assert editor.demos_used[-1] < 6
    assert len(tiny_backbone.tokenizer(context, add_special_tokens=False).input_ids) <= editor.context_budget


def test_edit_without_a_pool_still_states_the_new_fact(tiny_backbone, tiny_images, make_ike):
    editor = make_ike(tiny_backbone)
    context = editor.edit(EditRequest(tiny_images[0], PROMPT, "blue"))
    assert editor.demos_used[-1] == 0
    assert context == f"New Fact: {PROMPT} blue\nPrompt: {PROMPT} blue\n\nNew Fact: {PROMPT} blue\nPrompt: "
