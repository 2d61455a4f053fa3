"""The template table: its shape, and recognising a filled-in template."""
import pytest

from attrib.world.questions import CAPTION_PROMPT, VQA_FAMILIES
from attrib.world.templates import HELDOUT, TEMPLATES, TRAIN, match_template, template_table, templates


@pytest.mark.parametrize("family", VQA_FAMILIES)
def test_every_family_has_train_and_heldout_paraphrases(family):
    assert len(templates(family, TRAIN)) + len(templates(family, HELDOUT)) >= 4
    assert len(templates(family, TRAIN)) >= 3
    assert len(templates(family, HELDOUT)) >= 1


def test_caption_prompts():
    assert [t.text for t in templates("caption", TRAIN)] == [CAPTION_PROMPT]
    assert {t.text for t in templates("caption", HELDOUT)} == {"a picture of", "an image of"}


def test_keys_and_texts_unique_and_table_round_trips():
    assert len({t.key for t in TEMPLATES}) == len(TEMPLATES)
    assert len({t.text for t in TEMPLATES}) == len(TEMPLATES)
    assert len(template_table()) == len(TEMPLATES)


def test_fill_uses_the_right_article():
    exists = templates("exists", TRAIN)[0]
    assert exists.fill({"color": "orange", "shape": "cross"}) == "Is there an orange cross?"
    assert exists.fill({"color": "red", "shape": "cross"}) == "Is there a red cross?"


def test_match_template_finds_the_filled_template():
    for t in TEMPLATES:
        text = t.fill({"shape": "circle", "color": "blue", "region": "top left"})
        assert match_template(text) == t
    assert match_template("What is the capital of zorbia?") is None


def test_unknown_family_or_split_is_an_error():
    with pytest.raises(ValueError):
        templates("colour", TRAIN)
    with pytest.raises(ValueError):
        templates("count", "test")
