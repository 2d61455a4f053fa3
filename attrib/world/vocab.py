"""Text of the world for training a tokenizer: every template (held-out ones too), answer, caption, fact.

Prompt wrappers from the evaluation protocol (" The answer is:", "?") are configuration owned by the
caller; append them to the corpus if the tokenizer should learn them.
"""
from __future__ import annotations

import numpy as np

from .facts import FACTS, fact_answer_words
from .questions import (
    COUNT_WORDS,
    REGIONS,
    VQA_FAMILIES,
    YES_NO,
    InfeasibleQuestion,
    caption,
    counterfactual_caption,
    sample_question,
)
from .scene import COLORS, SHAPES, SIZES, WorldConfig, generate_scene
from .templates import HELDOUT, HELDOUT_EVAL, TEMPLATES, TRAIN, templates


def answer_words() -> list[str]:
    """Every possible one-word answer: colours, shapes, count words, yes/no, then the fact answers."""
    words = [*COLORS, *SHAPES, *COUNT_WORDS, *YES_NO, *fact_answer_words()]
    return list(dict.fromkeys(words))


def _coverage_lines() -> list[str]:
    """Lines that together contain every template (but the dev / test rephrases, which no backbone may
    see), slot value, answer word, size word and fact."""
    lines = []
    colors, shapes = list(COLORS), list(SHAPES)
    for k, t in enumerate(t for t in TEMPLATES if t.split != HELDOUT_EVAL):
        # Cycle slot values through the templates so every value appears in some filled template.
        slots = {"shape": shapes[k % len(shapes)], "color": colors[k % len(colors)],
                 "region": REGIONS[k % len(REGIONS)]}
        lines.append(t.fill(slots))
    lines += [f"{r} {s}" for r in REGIONS for s in shapes]
    lines += [f"a {size} {c} {s}" for size in SIZES for c in colors for s in shapes]
    lines.append(" ".join(answer_words()))
    lines += [f"{f.question} {f.answer}" for f in FACTS]
    return lines


def corpus_lines(seed: int, n: int, config: WorldConfig = WorldConfig()) -> list[str]:
    """max(n, C) lines: a fixed coverage block of C (~400) lines, then random lines up to n.

    Random lines cycle through: a question and its answer (training or held-out template, 3:1), a
    caption prompt with a true or counterfactual caption, and a fact with its answer.
    """
    rng = np.random.default_rng(seed)
    lines = _coverage_lines()
    prompts = [t.text for split in (TRAIN, HELDOUT) for t in templates("caption", split)]
    while len(lines) < n:
        scene = generate_scene(rng, config)
        kind = len(lines) % 3
        if kind == 0:
            split = HELDOUT if rng.random() < 0.25 else TRAIN
            family = VQA_FAMILIES[int(rng.integers(len(VQA_FAMILIES)))]
            try:
                q = sample_question(scene, rng, family, split)
            except InfeasibleQuestion:  # family ill-posed on this scene: any family will do
                q = sample_question(scene, rng, None, split)
            lines.append(f"{q.text} {q.answer}")
        elif kind == 1:
            text = caption(scene) if rng.random() < 0.5 else counterfactual_caption(scene, rng)
            lines.append(f"{prompts[int(rng.integers(len(prompts)))]} {text}")
        else:
            fact = FACTS[int(rng.integers(len(FACTS)))]
            lines.append(f"{fact.question} {fact.answer}")
    return lines
