"""Training batches from the world stream: which questions are asked, and their logits in one pass.

Language batches encode each image's prefix (template up to the prompt, image tokens included) once,
then repeat its KV cache for every continuation (questions and a caption) about that image — the same
logits as full sequences at a fraction of the cost. Facts run text-only through the backbone's text LM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from attrib.backbones.spec import BackboneSpec
from attrib.world import sample_question
from attrib.world.questions import ask, feasible_families
from attrib.world.scene import COLORS
from attrib.world.templates import templates as family_templates

IGNORE = -100


@dataclass
class Templates:
    """The backbone's conversation templates (from its spec or manifest)."""

    image: str  # with "{prompt}" and the image placeholder
    text: str  # text-only, with "{prompt}"

    @property
    def image_prefix(self) -> str:
        """The part before the prompt, without trailing space (BPE keeps " word" as one piece)."""
        return self.image.split("{prompt}")[0].rstrip()


def split_prompt(templates: Templates, prompt: str) -> str:
    """What follows the image prefix for ``prompt``: template(prompt) minus the prefix."""
    return templates.image.format(prompt=prompt)[len(templates.image_prefix):]


def encode_pieces(tokenizer, context: str, target: str, bos: bool) -> tuple[list[int], list[int]]:
    """ids and labels of ``context + " " + target + EOS``; labels only on the target and EOS."""
    head = tokenizer(context, add_special_tokens=bos).input_ids
    tail = tokenizer(" " + target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return head + tail, [IGNORE] * len(head) + tail


def right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _continuation_rows(tokenizer, templates: Templates, pairs: list[tuple[str, str]]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels of the text after the image prefix for each pair."""
    pieces = [encode_pieces(tokenizer, split_prompt(templates, prompt), target, bos=False)
              for prompt, target in pairs]
    ids = right_pad([row for row, _ in pieces], tokenizer.pad_token_id)
    mask = right_pad([[1] * len(row) for row, _ in pieces], 0)
    return ids, mask, right_pad([labels for _, labels in pieces], IGNORE)


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean next-token CE on labelled positions."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    counted = (labels != IGNORE).sum(1).clamp(min=1)
    return (token_loss.sum(1) / counted).mean()


class Continuations(NamedTuple):
    """What ``continuation_logits`` computed: [(logits, labels)] per row set; the attention weights of
    the requested LM layers on the pair rows ({layer: [rows, heads, T_pairs, prefix + T_pairs]}); and the
    prefix's input ids [images, prefix] (where the image tokens sit)."""

    sets: list[tuple[torch.Tensor, torch.Tensor]]
    attentions: dict[int, torch.Tensor]
    prefix_ids: torch.Tensor


def continuation_logits(model, processor, spec: BackboneSpec, templates: Templates, images: list,
                        pairs: list[list[tuple[str, str]]], lead: list[tuple[str, str]] | None = None,
                        attention_layers: tuple[int, ...] = ()) -> Continuations:
    """Logits and labels of every (prompt, target) continuation of each image, sharing its prefix.

    ``pairs[i]`` lists the same number of (prompt, target) pairs for ``images[i]``. The prefix (template up
    to the prompt, image tokens included) runs once per image; its KV cache is repeated per pair.
    ``lead[i]``, when given, is one more (prompt, target) for image i that runs in the same call as the
    prefix, so a long target (a caption) does not pad every short row to its length.
    ``sets`` holds [(logits [rows, T, V], labels [rows, T])]: the pairs first (image-major), then the lead
    rows; labels are IGNORE off the target + EOS; ``logits[:, t]`` predicts ``labels[:, t + 1]``.
    ``attention_layers`` asks for those LM layers' attention weights on the pair rows (the model must run
    eager attention: sdpa returns none).
    """
    tokenizer = processor.tokenizer
    per_image = len(pairs[0])
    if any(len(image_pairs) != per_image for image_pairs in pairs):
        raise ValueError("every image needs the same number of continuations")
    prefix = processor(images=images, text=[templates.image_prefix] * len(images), return_tensors="pt")
    prefix_len = prefix["input_ids"].shape[1]
    inputs = dict(prefix)
    if lead is not None:
        lead_ids, lead_mask, lead_labels = _continuation_rows(tokenizer, templates, lead)
        inputs["input_ids"] = torch.cat([prefix["input_ids"], lead_ids], dim=1)
        inputs["attention_mask"] = torch.cat([prefix["attention_mask"], lead_mask], dim=1)
    out = model(**inputs, use_cache=True)
    cache = getattr(out, "language_model_outputs", None) or out  # BLIP-2 nests the LM's outputs
    cache = cache.past_key_values
    sets, attentions = [], {}
    if lead is not None:
        cache.crop(-lead_ids.shape[1])  # back to the prefix for the pairs
        # Rows are prefix + lead: from the prefix's last position on, with no label on that position.
        lead_set = (out.logits[:, prefix_len - 1:],
                    torch.cat([torch.full((len(lead), 1), IGNORE), lead_labels], dim=1))
    if per_image:
        ids, cont_mask, labels = _continuation_rows(tokenizer, templates, [p for ps in pairs for p in ps])
        cache.batch_repeat_interleave(per_image)
        mask = torch.cat([prefix["attention_mask"].repeat_interleave(per_image, 0), cont_mask], dim=1)
        text_lm = model.get_submodule(spec.text_lm)
        out = text_lm(input_ids=ids, attention_mask=mask, cache=cache, output_attentions=bool(attention_layers))
        sets.append((out.logits, labels))
        if attention_layers:
            if not out.attentions or out.attentions[0] is None:
                raise ValueError("attention weights asked for, but the LM runs without them (use eager attention)")
            attentions = {layer: out.attentions[layer] for layer in attention_layers}
    if lead is not None:
        sets.append(lead_set)
    return Continuations(sets, attentions, prefix["input_ids"])


def pick_family(scene, rng: np.random.Generator, weights: dict[str, float] | None) -> str | None:
    """A question family for ``scene``: None (uniform over the feasible ones, sample_question's own
    choice) without weights, else drawn among the feasible families in proportion to ``weights``."""
    if weights is None:
        return None
    feasible = feasible_families(scene)
    p = np.array([weights.get(family, 0.0) for family in feasible])
    if p.sum() <= 0:
        raise ValueError(f"family weights {weights} leave none of {feasible} to ask")
    return feasible[int(rng.choice(len(feasible), p=p / p.sum()))]


def hard_negative(scene, rng: np.random.Generator, split: str = "train"):
    """An existence question answered "no" whose shape is in the scene in another colour (so only the
    colour-shape binding tells it apart from a "yes"), or None when the scene has no such question."""
    present = {(o.color, o.shape) for o in scene.objects}
    options = sorted({(color, o.shape) for o in scene.objects for color in COLORS if (color, o.shape) not in present})
    if not options:
        return None
    color, shape = options[int(rng.integers(len(options)))]
    templates = family_templates("exists", split)
    return ask(scene, "exists", {"color": color, "shape": shape}, templates[int(rng.integers(len(templates)))])


def existence_pair(scene, rng: np.random.Generator, colors: tuple[str, ...] = (), split: str = "train"):
    """Two existence questions on one scene that differ in the colour word only, same template: "is there a
    <absent> <shape>?" (no) and "is there a <colour> <shape>?" (yes), where one ``colour`` ``shape`` is in
    the scene and no ``absent`` one is; both colours from ``colors`` (default: all). Only the colour-shape
    binding tells the two apart. None when the scene has no such pair."""
    palette = colors or tuple(COLORS)
    present = [(o.color, o.shape) for o in scene.objects]
    options = sorted({(absent, color, shape) for color, shape in present
                      if color in palette and present.count((color, shape)) == 1
                      for absent in palette if (absent, shape) not in present})
    if not options:
        return None
    absent, color, shape = options[int(rng.integers(len(options)))]
    templates = family_templates("exists", split)
    template = templates[int(rng.integers(len(templates)))]
    return (ask(scene, "exists", {"color": absent, "shape": shape}, template),
            ask(scene, "exists", {"color": color, "shape": shape}, template))


def training_question(scene, rng: np.random.Generator, family_weights: dict[str, float] | None = None,
                      hard_negatives: float = 0.0):
    """A training-template question on ``scene``: family by ``pick_family``, then ``sample_question``;
    an existence question answered "no" becomes a ``hard_negative`` with chance ``hard_negatives`` (no
    extra draw at 0, so recipes without it keep their data stream)."""
    question = sample_question(scene, rng, pick_family(scene, rng, family_weights), split="train")
    if hard_negatives and question.family == "exists" and question.answer == "no" and rng.random() < hard_negatives:
        question = hard_negative(scene, rng) or question
    return question
