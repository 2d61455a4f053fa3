"""The two training losses of the default models: the vision stage's and the language stages'."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from attrib.backbones.spec import BackboneSpec
from attrib.defaults.batches import (
    IGNORE,
    Templates,
    continuation_logits,
    encode_pieces,
    existence_pair,
    right_pad,
    sequence_loss,
    training_question,
)
from attrib.defaults.looks import (
    CrossAttentionTap,
    answer_looks,
    direction_looks,
    layout_cells,
    layout_loss,
    object_attention_loss,
    query_spread,
    target_cells,
)
from attrib.defaults.recipe import PROMPTS, Stage
from attrib.world import FACTS, SHAPES, SIZES, WorldSampler, caption, render
from attrib.world.scene import COLORS

COLOR_NAMES = tuple(COLORS)


class LanguageBatch(NamedTuple):
    """One language batch's inputs: the images, their (prompt, answer) pairs (``questions_per_image`` each,
    image-major), one caption per image, and the looks of the stage's attention terms: ``cells`` (one entry
    per pair row, the answer's object cells or None) for answer looks, ``looks`` for direction looks,
    ``word_looks`` for the direction looks added beside the answer's (``direction_layers``)."""

    images: list
    pairs: list[list[tuple[str, str]]]
    captions: list[tuple[str, str]]
    cells: list[list[int] | None]
    looks: list
    word_looks: list


def _look_grid(model, spec: BackboneSpec, stage: Stage) -> int | None:
    """The side of the grid the looks' cells live on: LLaVA's patches, a laid-out Q-Former's query grid, or,
    through the queries' cross-attention (object_attention_loss's ``through``), a plain Q-Former's ViT
    patch grid; None without looks."""
    if not stage.attend_layers:
        return None
    if spec.grid_site == "vit" and stage.layout_weight:
        return math.isqrt(model.config.num_query_tokens)
    return spec.grid_shape(model.config)[1]


def language_batch(tokenizer, templates: Templates, sampler: WorldSampler, stage: Stage, grid: int | None
                   ) -> LanguageBatch:
    """Draw a stage's scenes and questions from ``sampler`` (its rng: the order of draws is the data stream)."""
    per_image = stage.questions_per_image
    images, pairs, captions, cells, looks, word_looks = [], [], [], [], [], []
    for _ in range(stage.batch_images):
        scene = sampler.scene()
        images.append(render(scene))
        image_pairs, questions = [], []
        while len(questions) < per_image:
            question = training_question(scene, sampler.rng, stage.family_weights, stage.hard_negatives)
            pair = None
            if (stage.exists_pairs and question.family == "exists" and len(questions) + 2 <= per_image
                    and sampler.rng.random() < stage.exists_pairs):
                pair = existence_pair(scene, sampler.rng, stage.pair_colors)
            questions += pair or [question]
        for question in questions:
            prompt = PROMPTS["vqa"].format(src=question.text)
            image_pairs.append((prompt, question.answer))
            row = len(pairs) * per_image + len(image_pairs) - 1
            if stage.attend_layers and stage.attend_from == "answer":  # one entry per row: answer_looks pairs them
                target = question.target
                cells.append(None if target is None else
                             target_cells(scene.objects[target].box, grid, scene.image_size // grid))
            elif stage.attend_layers:
                looks += direction_looks(tokenizer, templates, prompt, question, row, grid, scene.image_size)
            if stage.direction_layers:
                word_looks += direction_looks(tokenizer, templates, prompt, question, row, grid, scene.image_size)
        pairs.append(image_pairs)
        captions.append((PROMPTS["caption"].format(src="a photo of"), caption(scene)))
    return LanguageBatch(images, pairs, captions, cells, looks, word_looks)


def _check_looks(stage: Stage) -> None:
    if stage.attend_from not in ("answer", "directions"):
        raise ValueError(f"attend_from must be 'answer' or 'directions', got {stage.attend_from!r}")
    if stage.direction_layers and (not stage.attend_layers or stage.attend_from != "answer"):
        raise ValueError("direction_layers go beside the answer's looks (attend_layers, attend_from='answer')")


def language_loss(model, processor, spec: BackboneSpec, templates: Templates, sampler: WorldSampler,
                  stage: Stage) -> torch.Tensor:
    """One language batch of ``stage``: VQA answers and captions on fresh scenes, plus text-only facts.

    The stage's fields set the batch (`attrib.defaults.recipe.Stage`): ``family_weights`` skews which
    question families are asked (families a scene cannot pose are left out, the rest renormalised);
    ``hard_negatives`` / ``exists_pairs`` re-ask existence questions; ``attend_layers`` / ``attend_weight``
    add `object_attention_loss` at those LM layers (eager attention; on a Q-Former backbone without the
    layout term, routed through the queries' first cross-attention onto the ViT patch grid), from the
    answer position or from each direction word (``attend_from``), and ``direction_layers`` the direction
    words' looks beside the answer's; ``layout_weight`` adds `layout_loss` on the Q-Former's first
    cross-attention (eager attention).
    """
    _check_looks(stage)
    routed = bool(stage.attend_layers) and spec.grid_site == "vit" and not stage.layout_weight
    batch = language_batch(processor.tokenizer, templates, sampler, stage, _look_grid(model, spec, stage))
    tap = nullcontext()
    if stage.layout_weight or routed:
        if spec.grid_site != "vit":
            raise ValueError(f"{spec.name}: the layout term needs a Q-Former between the patches and the LM")
        tap = CrossAttentionTap(model.get_submodule(f"{spec.bridge[0]}.encoder.layer.0.crossattention.attention"))
    with tap:
        out = continuation_logits(model, processor, spec, templates, batch.images, batch.pairs, lead=batch.captions,
                                  attention_layers=tuple(sorted({*stage.attend_layers, *stage.direction_layers})))
    # Every sequence (question or caption) weighs the same, as one batch of full sequences would.
    rows = sum(len(labels) for _, labels in out.sets)
    loss = sum(sequence_loss(logits, labels) * len(labels) for logits, labels in out.sets) / rows
    if stage.attend_layers:
        spread = query_spread(tap.weights, spec.vit_has_cls) if routed else None
        loss = _add_look_terms(loss, model, stage, batch, out, spread)
    if stage.layout_weight:  # blocks of the ViT patch grid, not the query grid the looks use
        blocks = layout_cells(model.config.num_query_tokens, spec.grid_shape(model.config)[1])
        loss = loss + stage.layout_weight * layout_loss(tap.weights, blocks, spec.vit_has_cls)
    if stage.facts:
        loss = loss + stage.fact_weight * fact_loss(model, processor.tokenizer, spec, templates, sampler, stage.facts)
    return loss


def _add_look_terms(loss: torch.Tensor, model, stage: Stage, batch: LanguageBatch, out, spread) -> torch.Tensor:
    """``loss`` plus the attention terms of a batch: the stage's looks at ``attend_layers`` and the direction
    words' at ``direction_layers``; ``spread``: the queries' cross-attention spread, when the looks are routed."""
    looks = answer_looks(out.sets[0][1], batch.cells) if stage.attend_from == "answer" else batch.looks
    for layers, these in ((stage.attend_layers, looks), (stage.direction_layers, batch.word_looks)):
        if not layers:
            continue
        # each look's row asks about image row // questions_per_image (pair rows are image-major)
        through = None if spread is None else spread[[look.row // stage.questions_per_image for look in these]]
        loss = loss + stage.attend_weight * object_attention_loss(
            {layer: out.attentions[layer] for layer in layers}, out.prefix_ids, model.config.image_token_id,
            these, through)
    return loss


def fact_loss(model, tokenizer, spec: BackboneSpec, templates: Templates, sampler: WorldSampler,
              n_facts: int) -> torch.Tensor:
    """Answer NLL of ``n_facts`` facts drawn from ``sampler``, text-only through the spec's text LM."""
    text_lm = model.get_submodule(spec.text_lm)
    facts = [FACTS[int(k)] for k in sampler.rng.integers(len(FACTS), size=n_facts)]
    pieces = [encode_pieces(tokenizer, templates.text.format(prompt=PROMPTS["loc"].format(loc=f.question)),
                            f.answer, bos=True) for f in facts]
    ids = right_pad([p[0] for p in pieces], tokenizer.pad_token_id)
    fact_mask = right_pad([[1] * len(p[0]) for p in pieces], 0)
    fact_logits = text_lm(input_ids=ids, attention_mask=fact_mask).logits
    return sequence_loss(fact_logits, right_pad([p[1] for p in pieces], IGNORE))


class PatchHeads(torch.nn.Module):
    """Per-patch cosine classifiers for the vision stage: colour, shape and size of the object covering
    the patch (class 0 = background), and the patch's row and column in the grid.

    Logits are ``scale · cos(h, w_class)``: a linear head could read an attribute from a faint direction
    of the tower's features by growing its weights, and the LM that reads the same features later would
    have to find that faint direction too (colour, easy from pixels, ended up 3x weaker than the feature
    spread). With a fixed scale every attribute has to take a real share of each patch's feature norm.
    Row and column heads keep the position embeddings from washing out: with colour, shape and size heads
    only, row and column explained ~1 % of the object patches' feature variance (colour 30 %, shape 31 %),
    and questions about a named region had nothing to match.
    """

    ATTRIBUTES = ("color", "shape", "size", "row", "col")

    def __init__(self, width: int, grid: int, scale: float = 16.0):
        super().__init__()
        self.scale = scale
        classes = (len(COLOR_NAMES) + 1, len(SHAPES) + 1, len(SIZES) + 1, grid, grid)
        self.weights = torch.nn.ParameterDict({
            name: torch.nn.Parameter(torch.randn(n, width) * width ** -0.5)
            for name, n in zip(self.ATTRIBUTES, classes)})

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits [..., classes] of features ``hidden`` [..., width], one per attribute, in ATTRIBUTES order."""
        hidden = hidden.float()
        unit = F.normalize(hidden - hidden.mean(-1, keepdim=True), dim=-1)
        return tuple(self.scale * unit @ F.normalize(self.weights[name], dim=-1).T for name in self.ATTRIBUTES)


def patch_labels(scene, grid: int, patch: int) -> torch.Tensor:
    """LongTensor [5, grid*grid]: colour, shape and size class of the object covering each patch (0 where
    none does), then each patch's row and column."""
    labels = np.zeros((len(PatchHeads.ATTRIBUTES), grid, grid), dtype=np.int64)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v // patch for v in obj.box)
        labels[0, y0:y1, x0:x1] = COLOR_NAMES.index(obj.color) + 1
        labels[1, y0:y1, x0:x1] = SHAPES.index(obj.shape) + 1
        labels[2, y0:y1, x0:x1] = SIZES.index(obj.size) + 1
    labels[3] = np.arange(grid)[:, None]
    labels[4] = np.arange(grid)[None, :]
    return torch.from_numpy(labels.reshape(len(labels), -1))


def vision_loss(model, processor, spec: BackboneSpec, heads: PatchHeads, sampler: WorldSampler,
                n_images: int) -> tuple[torch.Tensor, float]:
    """Per-patch CE of the heads on the tower's last hidden states; also the shape accuracy on objects."""
    config = model.config.vision_config
    grid, patch = config.image_size // config.patch_size, config.patch_size
    scenes = [sampler.scene() for _ in range(n_images)]
    pixels = processor.image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    hidden = model.get_submodule(spec.vision_tower)(pixels, output_hidden_states=True).hidden_states[-1]
    hidden = hidden[:, 1:] if spec.vit_has_cls else hidden  # [B, grid*grid, width]
    labels = torch.stack([patch_labels(s, grid, patch) for s in scenes])  # [B, 5, grid*grid]
    logits = heads(hidden)
    loss = sum(F.cross_entropy(logit.transpose(1, 2), labels[:, k]) for k, logit in enumerate(logits))
    on_object = labels[:, 1] > 0
    shape_acc = (logits[1].argmax(-1) == labels[:, 1])[on_object].float().mean().item()
    return loss, shape_acc
