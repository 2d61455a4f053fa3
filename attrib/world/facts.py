"""Text-only facts about invented places, for T-Loc (`loc` / `loc_ans`) and for mixing into training.

The table is built by arithmetic, not by an RNG, so it is the same on every machine and numpy version:
60 invented entities x 4 of 8 relations = 240 facts. Answers come from a fixed pool of 50 words (each
relation has its own 6-7 words), so every answer word recurs 4-5 times and a small BPE tokenizer learns
it as one token. Questions read like MMEdit's NQ locality prompts: "nq question: what is the capital of
zorbia" (lowercase, no question mark: the T-Loc prompt template adds it).
"""
from __future__ import annotations

from dataclasses import dataclass

# Invented syllables: prefix i + ending j gives e.g. "zorbia", "kelvoran".
_PREFIXES: tuple[str, ...] = (
    "zor", "kel", "mav", "tir", "quor", "bel", "dros", "fen", "gal", "hux", "ilv", "jor",
    "lum", "nev", "oth", "pry", "rask", "sul", "tav", "ulm", "vex", "wen", "yar", "zan",
)
_ENDINGS: tuple[str, ...] = ("bia", "voran", "esh", "mira", "ondia", "istan")
N_ENTITIES = 60
RELATIONS_PER_ENTITY = 4

# relation question (with {e} for the entity) -> its answer words.
RELATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("what is the capital of {e}", ("morvale", "tessar", "quillan", "brenna", "ostrid", "varnel", "cadmor")),
    ("what currency is used in {e}", ("drab", "kelt", "florin", "marrow", "pell", "zint")),
    ("what language is spoken in {e}", ("velish", "ombric", "talari", "sundese", "korvic", "aelan")),
    ("what is the main export of {e}", ("copper", "salt", "wool", "amber", "timber", "silk", "tin")),
    ("what is the national animal of {e}", ("otter", "heron", "lynx", "badger", "falcon", "ibex")),
    ("who founded {e}", ("aldric", "maren", "tobin", "isolde", "corwin", "elspeth")),
    ("what river flows through {e}", ("sarn", "velda", "orrin", "thale", "mirrow", "calder")),
    ("what sport is popular in {e}", ("hurling", "fencing", "rowing", "archery", "curling", "polo")),
)
FACT_PREFIX = "nq question: "


@dataclass(frozen=True)
class Fact:
    """One fact: `question` is the full T-Loc prompt ("nq question: ..."), `answer` one lowercase word."""

    question: str
    answer: str
    entity: str
    relation: int  # index into RELATIONS


def entity_names() -> list[str]:
    """The invented entity names, in table order ("zorbia", "kelvoran", ...)."""
    names = []
    for k in range(N_ENTITIES):
        # k and k+24 and k+48 share a prefix; shifting the ending by k // 24 keeps all names distinct.
        names.append(_PREFIXES[k % len(_PREFIXES)] + _ENDINGS[(k + k // len(_PREFIXES)) % len(_ENDINGS)])
    return names


def _build_facts() -> tuple[Fact, ...]:
    facts = []
    used = [0] * len(RELATIONS)  # facts of each relation so far
    for e, name in enumerate(entity_names()):
        # Even entities get relations 0,2,4,6 and odd ones 1,3,5,7: every relation gets 30 entities.
        for j in range(RELATIONS_PER_ENTITY):
            r = (e + 2 * j) % len(RELATIONS)
            template, pool = RELATIONS[r]
            # Stride 5 is coprime with the pool sizes (6, 7): the n-th fact of a relation cycles through
            # all its words, so each word answers 4-5 facts, in an order unrelated to the entity names.
            answer = pool[(5 * used[r] + r) % len(pool)]
            used[r] += 1
            facts.append(Fact(FACT_PREFIX + template.format(e=name), answer, name, r))
    return tuple(facts)


FACTS: tuple[Fact, ...] = _build_facts()


def fact_answer_words() -> list[str]:
    """Every word a fact can be answered with (the 50-word pool), in table order."""
    return [word for _, pool in RELATIONS for word in pool]
