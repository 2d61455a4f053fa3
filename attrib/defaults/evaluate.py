"""Held-out quality of a default backbone: per-family VQA accuracy, facts, caption token accuracy.

Everything is measured on a world seed never used in training, through `load_backbone` (the shipped
fp16 weights, loaded in fp32), with the same prompt formats the editing protocol uses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from attrib.answers import greedy_answers, teacher_forced_hits
from attrib.backbones.loader import load_backbone
from attrib.defaults.recipe import PROMPTS
from attrib.world import (
    FACTS,
    VQA_FAMILIES,
    InfeasibleQuestion,
    WorldConfig,
    WorldSampler,
    caption,
    render,
    sample_question,
)

HELDOUT_SEED = 10_007


def family_batch(sampler: WorldSampler, family: str, n: int, split: str) -> tuple[list, list[str], list[str]]:
    """(images, VQA prompts, answers) of ``n`` fresh questions of ``family`` (``split``'s templates)."""
    images, prompts, answers = [], [], []
    while len(prompts) < n:
        scene = sampler.scene()
        try:
            question = sample_question(scene, sampler.rng, family=family, split=split)
        except InfeasibleQuestion:
            continue
        images.append(render(scene))
        prompts.append(PROMPTS["vqa"].format(src=question.text))
        answers.append(question.answer)
    return images, prompts, answers


def _chunks(n: int, size: int):
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def evaluate_default(name: str, path: str | Path, n_per_family: int = 200, batch: int = 50,
                     seed: int = HELDOUT_SEED) -> dict:
    """Accuracies (fractions) on a held-out world seed; also the 3–4-object split and held-out templates."""
    backbone = load_backbone(name, path)
    results: dict = {"seed": seed, "n_per_family": n_per_family}
    for label, split, objects in (("vqa", "train", (1, 4)), ("vqa_3to4_objects", "train", (3, 4)),
                                  ("vqa_heldout_templates", "heldout", (1, 4))):
        sampler = WorldSampler(WorldConfig(), seed=seed, min_objects=objects[0], max_objects=objects[1])
        per_family = {}
        for family in VQA_FAMILIES:
            images, prompts, answers = family_batch(sampler, family, n_per_family, split)
            first, greedy = [], []
            for lo, hi in _chunks(len(prompts), batch):
                first += [h[0] for h in teacher_forced_hits(backbone, images[lo:hi], prompts[lo:hi], answers[lo:hi])]
                if label == "vqa":
                    greedy += [g == a for g, a in zip(greedy_answers(backbone, images[lo:hi], prompts[lo:hi]),
                                                      answers[lo:hi])]
            per_family[family] = {"first_token": round(float(np.mean(first)), 4)}
            if greedy:
                per_family[family]["greedy"] = round(float(np.mean(greedy)), 4)
        results[label] = per_family
    fact_prompts = [PROMPTS["loc"].format(loc=f.question) for f in FACTS]
    fact_answers = [f.answer for f in FACTS]
    first, greedy = [], []
    for lo, hi in _chunks(len(FACTS), batch):
        first += [h[0] for h in teacher_forced_hits(backbone, None, fact_prompts[lo:hi], fact_answers[lo:hi])]
        greedy += [g == a for g, a in zip(greedy_answers(backbone, None, fact_prompts[lo:hi]), fact_answers[lo:hi])]
    results["facts"] = {"first_token": round(float(np.mean(first)), 4), "greedy": round(float(np.mean(greedy)), 4),
                        "n": len(FACTS)}
    sampler = WorldSampler(WorldConfig(), seed=seed + 1)
    scenes = [sampler.scene() for _ in range(n_per_family)]
    tokens = []
    for lo, hi in _chunks(len(scenes), batch):
        part = scenes[lo:hi]
        hits = teacher_forced_hits(backbone, [render(s) for s in part], [PROMPTS["caption"].format(src="a photo of")]
                                   * len(part), [caption(s) for s in part])
        tokens += [x for row in hits for x in row]
    results["caption_token_accuracy"] = round(float(np.mean(tokens)), 4)
    return results
