"""The synthetic visual world with ground truth: scenes, questions, facts, datasets.

Scenes are coloured shapes snapped to the ViT patch grid over a grey textured background; every
question is about a known object with a known pixel box, so attribution heatmaps can be checked.

    from attrib.world import WorldConfig, WorldSampler, write_world
    sampler = WorldSampler(WorldConfig(), seed=0)        # online training stream (training templates only)
    write_world("runs/world", seed=0)                    # MMEdit-format JSON + PNGs + truth.json
"""
from .dataset import FIELDS, SPLITS, WorldRecord, build_split, make_record, write_world
from .facts import FACTS, Fact
from .questions import (
    CAPTION_PROMPT,
    COUNT_WORDS,
    REGIONS,
    VQA_FAMILIES,
    InfeasibleQuestion,
    Question,
    caption,
    counterfactual,
    counterfactual_caption,
    evaluate,
    rephrase_question,
    sample_question,
)
from .sampler import QA, CaptionItem, VqaItem, WorldSampler
from .scene import COLORS, SHAPES, SIZES, Scene, WorldConfig, WorldObject, generate_scene, render
from .templates import TEMPLATES, Template, match_template, templates
from .variants import caption_variant, question_variant
from .vocab import answer_words, corpus_lines

__all__ = [
    "CAPTION_PROMPT", "COLORS", "COUNT_WORDS", "FACTS", "FIELDS", "REGIONS", "SHAPES", "SIZES", "SPLITS",
    "TEMPLATES", "VQA_FAMILIES", "QA", "CaptionItem", "Fact", "InfeasibleQuestion", "Question", "Scene",
    "Template", "VqaItem", "WorldConfig", "WorldObject", "WorldRecord", "WorldSampler", "answer_words",
    "build_split", "caption", "caption_variant", "counterfactual", "counterfactual_caption", "corpus_lines",
    "evaluate", "generate_scene", "make_record", "match_template", "question_variant", "rephrase_question", "render",
    "sample_question", "templates", "write_world",
]
