"""Tokenizer corpus and answer vocabulary."""
from attrib.world.facts import FACTS, fact_answer_words
from attrib.world.questions import COUNT_WORDS, YES_NO
from attrib.world.scene import COLORS, SHAPES
from attrib.world.templates import TEMPLATES, match_template
from attrib.world.vocab import answer_words, corpus_lines


def test_answer_words_cover_every_answer_once():
    words = answer_words()
    assert len(set(words)) == len(words)
    expected = set(COLORS) | set(SHAPES) | set(COUNT_WORDS) | set(YES_NO) | set(fact_answer_words())
    assert set(words) == expected
    assert all(w.isalpha() and w.islower() for w in words)


def test_corpus_is_deterministic_and_sized():
    a = corpus_lines(0, 1000)
    assert a == corpus_lines(0, 1000) and a != corpus_lines(1, 1000)
    assert len(a) == 1000
    assert len(corpus_lines(0, 10)) > 10  # the coverage block is always included


def test_corpus_covers_every_template_answer_and_fact():
    lines = corpus_lines(0, 600)
    matched = {t.key for line in lines if (t := match_template(line)) is not None}
    # Held-out templates included; the dev / test rephrases never (no backbone may see them).
    assert matched == {t.key for t in TEMPLATES if t.split != "heldout_eval"}
    words = set(" ".join(lines).split())
    assert set(answer_words()) <= words
    assert {f"{f.question} {f.answer}" for f in FACTS} <= set(lines)
