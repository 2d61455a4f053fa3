"""The invented-fact table used for T-Loc."""
from collections import Counter

from attrib.world.facts import FACT_PREFIX, FACTS, entity_names, fact_answer_words
from attrib.world.questions import COUNT_WORDS, YES_NO
from attrib.world.scene import COLORS, SHAPES


def test_at_least_200_unique_facts_with_one_word_answers():
    assert len(FACTS) >= 200
    assert len({f.question for f in FACTS}) == len(FACTS)
    for f in FACTS:
        assert f.question.startswith(FACT_PREFIX) and f.question == f.question.lower()
        assert f.entity in f.question and not f.question.endswith("?")
        assert f.answer.isalpha() and f.answer.islower()


def test_answer_pool_is_small_and_every_word_recurs():
    pool = fact_answer_words()
    assert 40 <= len(pool) <= 60 and len(set(pool)) == len(pool)
    uses = Counter(f.answer for f in FACTS)
    assert set(uses) == set(pool)
    assert min(uses.values()) >= 3


def test_entities_are_invented_and_distinct():
    names = entity_names()
    assert len(set(names)) == len(names)
    assert {"zorbia", "kelvoran"} <= set(names)
    clash = set(names) & (set(fact_answer_words()) | set(COLORS) | set(SHAPES) | set(COUNT_WORDS) | set(YES_NO))
    assert not clash


def test_fact_answers_do_not_overlap_visual_answers():
    visual = set(COLORS) | set(SHAPES) | set(COUNT_WORDS) | set(YES_NO)
    assert not visual & set(fact_answer_words())


def test_table_is_fixed():
    # Built by arithmetic, not an RNG: pin two rows so an accidental reordering shows up.
    assert (FACTS[0].question, FACTS[0].answer) == ("nq question: what is the capital of zorbia", "morvale")
    assert len(FACTS) == 240
