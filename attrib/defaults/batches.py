"""Training batches from the world stream.

Language batches encode each image's prefix (template up to the prompt, image tokens included) once,
then repeat its KV cache for every continuation (questions and a caption) about that image — the same
logits as full sequences at a fraction of the cost. Facts run text-only through the backbone's text LM.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from attrib.backbones.spec import BackboneSpec
from attrib.defaults.recipe import PROMPTS
from attrib.world import FACTS, SHAPES, SIZES, WorldSampler, caption, render, sample_question
from attrib.world.questions import ask, feasible_families, region_box
from attrib.world.templates import templates as family_templates
from attrib.world.scene import COLORS

COLOR_NAMES = tuple(COLORS)
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


def _encode_pieces(tokenizer, context: str, target: str, bos: bool) -> tuple[list[int], list[int]]:
    """ids and labels of ``context + " " + target + EOS``; labels only on the target and EOS."""
    head = tokenizer(context, add_special_tokens=bos).input_ids
    tail = tokenizer(" " + target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return head + tail, [IGNORE] * len(head) + tail


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _continuation_rows(tokenizer, templates: Templates, pairs: list[tuple[str, str]]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels of the text after the image prefix for each pair."""
    pieces = [_encode_pieces(tokenizer, split_prompt(templates, prompt), target, bos=False)
              for prompt, target in pairs]
    ids = _right_pad([row for row, _ in pieces], tokenizer.pad_token_id)
    mask = _right_pad([[1] * len(row) for row, _ in pieces], 0)
    return ids, mask, _right_pad([labels for _, labels in pieces], IGNORE)


def _sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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


def target_cells(box: tuple[int, int, int, int], grid: int, patch: int) -> list[int]:
    """Row-major indices of the grid cells a pixel box touches (on a patch-snapped box, those it covers)."""
    x0, y0 = box[0] // patch, box[1] // patch
    x1, y1 = -(-box[2] // patch), -(-box[3] // patch)
    return [row * grid + col for row in range(y0, y1) for col in range(x0, x1)]


class Look(NamedTuple):
    """A text position of one continuation row that should look at given grid cells of the image."""

    row: int
    at: int  # index into the row
    cells: list[int]


def answer_looks(labels: torch.Tensor, cells: list[list[int] | None]) -> list[Look]:
    """The position predicting each row's first target token, looking at ``cells[r]`` (None: no look)."""
    first = (labels != IGNORE).float().argmax(1)
    return [Look(r, int(first[r]) - 1, c) for r, c in enumerate(cells) if c]


def object_attention_loss(attentions: dict[int, torch.Tensor], prefix_ids: torch.Tensor, image_token_id: int,
                          looks: list[Look], through: torch.Tensor | None = None) -> torch.Tensor:
    """How far text positions' looks at the image miss the cells they should look at.

    For each look, in every given layer: the share of the heads' summed attention on the image tokens
    that lands on the look's cells; the loss is the mean of -log(share) over layers and looks. Only where
    the model looks within the image is pressed, not how much it looks at the image at all. Zero without
    looks.

    ``through`` [looks, image tokens, cells], when the image tokens are not the grid's cells (a Q-Former's
    queries): how each image token's attention spreads over the cells, rows summing to 1; an image token
    then counts toward a look by the share of it that lands on the look's cells, and gradient reaches both
    the LM's attention and that spread.
    """
    image_at = (prefix_ids[0] == image_token_id).nonzero()[:, 0]
    if not ((prefix_ids == image_token_id).sum(1) == len(image_at)).all():
        raise ValueError("every image prefix must hold the same image token positions")
    if not looks:
        return torch.zeros(())
    rows, at = torch.tensor([k.row for k in looks]), torch.tensor([k.at for k in looks])
    if through is None:
        hit = torch.zeros(len(looks), len(image_at), dtype=torch.bool)
        for k, look in enumerate(looks):
            hit[k, look.cells] = True
    else:
        if through.shape[:2] != (len(looks), len(image_at)):
            raise ValueError(f"through {tuple(through.shape)} does not match {len(looks)} looks at "
                             f"{len(image_at)} image tokens")
        hit = torch.stack([through[k][:, look.cells].sum(-1) for k, look in enumerate(looks)])
    terms = []
    for weights in attentions.values():
        on_image = weights[rows, :, at][:, :, image_at].sum(1)  # [looks, image tokens], heads summed
        share = (on_image * hit).sum(1) / on_image.sum(1).clamp(min=1e-9)
        terms.append(-torch.log(share + 1e-6))
    return torch.stack(terms).mean()


def layout_cells(n_queries: int, grid: int) -> list[list[int]]:
    """Each query token's block of the patch grid: the grid cut into a √n × √n layout of equal blocks,
    queries in row-major order (16 queries on 8 × 8 patches: query 5 owns rows 2-3, columns 2-3)."""
    side = math.isqrt(n_queries)
    if side * side != n_queries or grid % side:
        raise ValueError(f"{n_queries} query tokens do not tile a {grid} x {grid} patch grid")
    block = grid // side
    return [[row * grid + col for row in range(qr * block, (qr + 1) * block)
             for col in range(qc * block, (qc + 1) * block)]
            for qr in range(side) for qc in range(side)]


def layout_loss(cross_attention: torch.Tensor, cells: list[list[int]], has_cls: bool) -> torch.Tensor:
    """How far each query token's cross-attention over the image misses its own block of patches.

    ``cross_attention`` [images, heads, queries, keys] (keys: the vision tower's outputs, CLS first when
    ``has_cls``); per query and image, the share of the heads' summed attention that lands on the query's
    cells; the loss is the mean of -log(share).
    """
    images, _, queries, keys = cross_attention.shape
    if len(cells) != queries:
        raise ValueError(f"{len(cells)} layout blocks for {queries} query tokens")
    hit = torch.zeros(queries, keys, dtype=torch.bool)
    for q, block in enumerate(cells):
        hit[q, [c + int(has_cls) for c in block]] = True
    weights = cross_attention.sum(1)  # [images, queries, keys]
    share = (weights * hit).sum(-1) / weights.sum(-1).clamp(min=1e-9)
    return -torch.log(share + 1e-6).mean()


def query_spread(cross_attention: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """[images, queries, patches]: how each query token's cross-attention (``cross_attention`` [images, heads,
    queries, keys], CLS first when ``has_cls``) spreads over the patch grid, heads summed, the CLS share
    left out and each row renormalised to 1."""
    weights = cross_attention.sum(1)[..., int(has_cls):]
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-9)


class CrossAttentionTap:
    """Keeps the attention weights of a Q-Former cross-attention module's last forward (with gradient);
    the module must run eager attention. A context manager: the hook goes when the block ends."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.weights, self._handle = module, None, None

    def __enter__(self) -> "CrossAttentionTap":
        self._handle = self.module.register_forward_hook(self._keep)
        return self

    def _keep(self, module, inputs, output) -> None:
        if output[1] is None:
            raise ValueError("cross-attention weights asked for, but the Q-Former runs without them "
                             "(use eager attention)")
        self.weights = output[1]

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _token_ending_at(tokenizer, text: str, char_end: int) -> int:
    """Index of the token of ``text`` that ends at character ``char_end`` (a token boundary)."""
    head = tokenizer(text[:char_end], add_special_tokens=False).input_ids
    if tokenizer(text, add_special_tokens=False).input_ids[: len(head)] != head:
        raise ValueError(f"{text[:char_end]!r} does not end on a token boundary of {text!r}")
    return len(head) - 1


DIRECTIONS = ("top", "bottom", "left", "right")


def direction_looks(tokenizer, templates: Templates, prompt: str, question, row: int, grid: int,
                    image_size: int) -> list[Look]:
    """Each direction word of a position question's region ("top" and "left" of "top left") looking at
    the half of the image it names; none for other questions."""
    region = question.slots.get("region")
    if region is None:
        return []
    continuation = split_prompt(templates, prompt)
    start = continuation.index(question.text) + question.text.index(region)
    looks, offset = [], 0
    for word in region.split():
        offset = region.index(word, offset) + len(word)
        if word in DIRECTIONS:
            at = _token_ending_at(tokenizer, continuation, start + offset)
            looks.append(Look(row, at, target_cells(region_box(f"{word} half", image_size), grid, image_size // grid)))
    return looks


def language_loss(model, processor, spec: BackboneSpec, templates: Templates, sampler: WorldSampler,
                  n_images: int, questions_per_image: int, n_facts: int, fact_weight: float,
                  family_weights: dict[str, float] | None = None, attend_layers: tuple[int, ...] = (),
                  attend_weight: float = 0.0, attend_from: str = "answer", hard_negatives: float = 0.0,
                  layout_weight: float = 0.0, exists_pairs: float = 0.0,
                  pair_colors: tuple[str, ...] = (), direction_layers: tuple[int, ...] = ()) -> torch.Tensor:
    """One language batch: VQA answers and captions on fresh scenes, plus text-only facts.

    ``family_weights`` (family → relative share) skews which question families are asked; families
    a scene cannot pose are left out and the rest renormalised. ``attend_layers`` / ``attend_weight`` add
    ``object_attention_loss`` at those LM layers (eager attention; on a Q-Former backbone without the layout
    term, routed through the queries' first cross-attention onto the ViT patch grid):
    the asked-about object looked at from the answer position (``attend_from="answer"``), or each direction
    word of a position question's region looking at the half it names (``"directions"``).
    ``direction_layers`` adds the direction words' looks at those layers beside ``attend_from="answer"``'s
    (same weight), so one stage can ground both.
    ``hard_negatives``: the chance that an existence question answered "no" is asked again as a
    ``hard_negative`` (its shape present in another colour) where the scene has one; yes / no stay balanced.
    ``exists_pairs``: the chance that an existence question is replaced by an ``existence_pair`` (colours
    from ``pair_colors``), both asked on the image, where the scene has one and the image has room for two.
    ``layout_weight`` adds ``layout_loss`` on the Q-Former's first cross-attention (a Q-Former backbone,
    eager attention): each query token pressed onto its own block of the patch grid (``layout_cells``).
    """
    if attend_from not in ("answer", "directions"):
        raise ValueError(f"attend_from must be 'answer' or 'directions', got {attend_from!r}")
    tokenizer = processor.tokenizer
    if direction_layers and (not attend_layers or attend_from != "answer"):
        raise ValueError("direction_layers go beside the answer's looks (attend_layers, attend_from='answer')")
    grid = None
    # Where the looks' cells live: LLaVA's patches, a laid-out Q-Former's query grid, or, through the
    # queries' cross-attention (object_attention_loss's ``through``), a plain Q-Former's ViT patch grid.
    routed = bool(attend_layers) and spec.grid_site == "vit" and not layout_weight
    if attend_layers:
        grid = (math.isqrt(model.config.num_query_tokens) if spec.grid_site == "vit" and layout_weight
                else spec.grid_shape(model.config)[1])
    images, pairs, captions, cells, looks, word_looks = [], [], [], [], [], []
    for _ in range(n_images):
        scene = sampler.scene()
        images.append(render(scene))
        image_pairs, questions = [], []
        while len(questions) < questions_per_image:
            question = training_question(scene, sampler.rng, family_weights, hard_negatives)
            pair = None
            if (exists_pairs and question.family == "exists" and len(questions) + 2 <= questions_per_image
                    and sampler.rng.random() < exists_pairs):
                pair = existence_pair(scene, sampler.rng, pair_colors)
            questions += pair or [question]
        for question in questions:
            prompt = PROMPTS["vqa"].format(src=question.text)
            image_pairs.append((prompt, question.answer))
            row = len(pairs) * questions_per_image + len(image_pairs) - 1
            if attend_layers and attend_from == "answer":  # one entry per row: answer_looks pairs them up
                target = question.target
                cells.append(None if target is None else
                             target_cells(scene.objects[target].box, grid, scene.image_size // grid))
            elif attend_layers:
                looks += direction_looks(tokenizer, templates, prompt, question, row, grid, scene.image_size)
            if direction_layers:
                word_looks += direction_looks(tokenizer, templates, prompt, question, row, grid, scene.image_size)
        pairs.append(image_pairs)
        captions.append((PROMPTS["caption"].format(src="a photo of"), caption(scene)))
    tap = nullcontext()
    if layout_weight or routed:
        if spec.grid_site != "vit":
            raise ValueError(f"{spec.name}: the layout term needs a Q-Former between the patches and the LM")
        tap = CrossAttentionTap(model.get_submodule(f"{spec.bridge[0]}.encoder.layer.0.crossattention.attention"))
    with tap:
        out = continuation_logits(model, processor, spec, templates, images, pairs, lead=captions,
                                  attention_layers=tuple(sorted({*attend_layers, *direction_layers})))
    sets = out.sets
    # Every sequence (question or caption) weighs the same, as one batch of full sequences would.
    rows = sum(len(labels) for _, labels in sets)
    loss = sum(_sequence_loss(logits, labels) * len(labels) for logits, labels in sets) / rows
    if attend_layers:
        if attend_from == "answer":
            looks = answer_looks(sets[0][1], cells)
        spread = query_spread(tap.weights, spec.vit_has_cls) if routed else None
        for layers, these in ((attend_layers, looks), (direction_layers, word_looks)):
            if not layers:
                continue
            # each look's row asks about image row // questions_per_image (pair rows are image-major)
            through = None if spread is None else spread[[look.row // questions_per_image for look in these]]
            loss = loss + attend_weight * object_attention_loss({layer: out.attentions[layer] for layer in layers},
                                                                out.prefix_ids, model.config.image_token_id,
                                                                these, through)
    if layout_weight:  # blocks of the ViT patch grid, not the query grid the looks use
        blocks = layout_cells(model.config.num_query_tokens, spec.grid_shape(model.config)[1])
        loss = loss + layout_weight * layout_loss(tap.weights, blocks, spec.vit_has_cls)
    if n_facts:
        text_lm = model.get_submodule(spec.text_lm)
        facts = [FACTS[int(k)] for k in sampler.rng.integers(len(FACTS), size=n_facts)]
        pieces = [_encode_pieces(tokenizer, templates.text.format(prompt=PROMPTS["loc"].format(loc=f.question)),
                                 f.answer, bos=True) for f in facts]
        ids = _right_pad([p[0] for p in pieces], tokenizer.pad_token_id)
        fact_mask = _right_pad([[1] * len(p[0]) for p in pieces], 0)
        fact_logits = text_lm(input_ids=ids, attention_mask=fact_mask).logits
        loss = loss + fact_weight * _sequence_loss(fact_logits, _right_pad([p[1] for p in pieces], IGNORE))
    return loss


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
