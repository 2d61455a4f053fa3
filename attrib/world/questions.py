"""Questions and captions about a scene, each answered by one lowercase word known from the scene.

Every family is a row of `FAMILY_TABLE`: its answer type, the slot values to try, and a function giving
the answer and the asked-about object on a scene (or None where the question is ill-posed). `evaluate`
also re-asks a question on a re-rendered scene, which is how `image_rephrase` variants are validated.

Families: color_of_shape (unique shape -> colour), shape_of_color (unique colour -> shape), count (-> "one"..
"four"), position (the only object in a named quadrant or half -> shape), exists (colour+shape -> yes/no).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .scene import COLORS, SHAPES, SIZES, Box, Scene
from .templates import HELDOUT, TRAIN, Template, templates

COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")  # WorldConfig caps scenes at 4 objects
YES_NO: tuple[str, ...] = ("yes", "no")
REGIONS: tuple[str, ...] = (
    "top left", "top right", "bottom left", "bottom right", "left half", "right half", "top half", "bottom half"
)
CAPTION_FAMILY = "caption"
CAPTION_PROMPT = "a photo of"
CAPTION_JOINER = " and "


class InfeasibleQuestion(ValueError):
    """The requested family has no well-posed question on this scene (e.g. no unique shape)."""


@dataclass(frozen=True)
class Question:
    """A filled-in question with its answer.

    target: index into scene.objects of the object the question is about, None where no single object
    is (count, exists with answer "no"). slots: the values filled into the template.
    """

    family: str
    text: str
    answer: str
    target: int | None
    slots: dict[str, str] = field(default_factory=dict)
    template: str = ""

    def box(self, scene: Scene) -> Box | None:
        """Pixel box (x0, y0, x1, y1; x1/y1 exclusive) of the asked-about object in `scene`, or None."""
        return None if self.target is None else scene.objects[self.target].box


def region_box(region: str, image_size: int = 64) -> Box:
    """Pixel box of a named quadrant or half (x1/y1 exclusive)."""
    s, h = image_size, image_size // 2
    boxes = {
        "top left": (0, 0, h, h), "top right": (h, 0, s, h), "bottom left": (0, h, h, s), "bottom right": (h, h, s, s),
        "left half": (0, 0, h, s), "right half": (h, 0, s, s), "top half": (0, 0, s, h), "bottom half": (0, h, s, s),
    }
    return boxes[region]


def _inside(inner: Box, outer: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _intersects(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _only(indices: list[int]) -> int | None:
    return indices[0] if len(indices) == 1 else None


Answer = tuple[str, int | None]  # (answer word, index of the asked-about object or None)


def _color_of_shape(scene: Scene, slots: dict[str, str]) -> Answer | None:
    i = _only([k for k, o in enumerate(scene.objects) if o.shape == slots["shape"]])
    return None if i is None else (scene.objects[i].color, i)


def _shape_of_color(scene: Scene, slots: dict[str, str]) -> Answer | None:
    i = _only([k for k, o in enumerate(scene.objects) if o.color == slots["color"]])
    return None if i is None else (scene.objects[i].shape, i)


def _count(scene: Scene, slots: dict[str, str]) -> Answer | None:
    return COUNT_WORDS[len(scene.objects) - 1], None


def _position(scene: Scene, slots: dict[str, str]) -> Answer | None:
    region = region_box(slots["region"], scene.image_size)
    inside = [k for k, o in enumerate(scene.objects) if _inside(o.box, region)]
    touching = [k for k, o in enumerate(scene.objects) if _intersects(o.box, region)]
    # Unambiguous only if no other object even pokes into the region.
    i = _only(inside) if inside == touching else None
    return None if i is None else (scene.objects[i].shape, i)


def _exists(scene: Scene, slots: dict[str, str]) -> Answer | None:
    matches = [k for k, o in enumerate(scene.objects) if (o.color, o.shape) == (slots["color"], slots["shape"])]
    if not matches:
        return "no", None
    return None if len(matches) > 1 else ("yes", matches[0])  # two matches: no single box to point at


@dataclass(frozen=True)
class QuestionFamily:
    """One question family as data.

    answers: its answer type (every answer it can give); slot_options: every slot assignment to try;
    evaluate: (scene, slots) -> (answer, target) or None when ill-posed on that scene;
    balance_answers: sample each possible answer equally often (exists: yes and no), not each slot.
    """

    name: str
    answers: tuple[str, ...]
    slot_options: tuple[dict[str, str], ...]
    evaluate: Callable[[Scene, dict[str, str]], Answer | None]
    balance_answers: bool = False


FAMILY_TABLE: dict[str, QuestionFamily] = {
    f.name: f
    for f in (
        QuestionFamily("color_of_shape", tuple(COLORS), tuple({"shape": s} for s in SHAPES), _color_of_shape),
        QuestionFamily("shape_of_color", SHAPES, tuple({"color": c} for c in COLORS), _shape_of_color),
        QuestionFamily("count", COUNT_WORDS, ({},), _count),
        QuestionFamily("position", SHAPES, tuple({"region": r} for r in REGIONS), _position),
        QuestionFamily(
            "exists", YES_NO, tuple({"color": c, "shape": s} for c in COLORS for s in SHAPES), _exists,
            balance_answers=True,
        ),
    )
}


VQA_FAMILIES: tuple[str, ...] = tuple(FAMILY_TABLE)


def _family(name: str) -> QuestionFamily:
    if name not in FAMILY_TABLE:
        raise ValueError(f"unknown question family {name!r}; known: {', '.join(FAMILY_TABLE)}")
    return FAMILY_TABLE[name]


def evaluate(scene: Scene, family: str, slots: dict[str, str]) -> Answer | None:
    """(answer, target index) of a question on a scene, or None when it is ill-posed there
    (shape/colour not unique, region not holding exactly one object, colour+shape present twice)."""
    return _family(family).evaluate(scene, slots)


def _slot_groups(scene: Scene, family: str) -> list[list[dict[str, str]]]:
    """Well-posed slot values in groups; sampling picks a group uniformly, then a member. One group per
    answer for answer-balanced families (so "yes" and "no" are equally common), else a single group."""
    fam = _family(family)
    groups: dict[str, list[dict[str, str]]] = {}
    for slots in fam.slot_options:
        result = fam.evaluate(scene, slots)
        if result is not None:
            groups.setdefault(result[0] if fam.balance_answers else "", []).append(slots)
    return list(groups.values())


def feasible_families(scene: Scene) -> list[str]:
    """Families with at least one well-posed question on the scene (count and exists always have one)."""
    return [f for f in VQA_FAMILIES if _slot_groups(scene, f)]


def ask(scene: Scene, family: str, slots: dict[str, str], template: Template) -> Question:
    """The question `template` asks with these slots, answered on `scene` (InfeasibleQuestion if ill-posed)."""
    result = evaluate(scene, family, slots)
    if result is None:
        raise InfeasibleQuestion(f"{family} with {slots} is ill-posed on this scene")
    answer, target = result
    return Question(family, template.fill(slots), answer, target, dict(slots), template.key)


def _pick(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def sample_question(
    scene: Scene, rng: np.random.Generator, family: str | None = None, split: str = TRAIN
) -> Question:
    """A random well-posed question on the scene in a template of `split` ("train" or "heldout").

    family=None picks uniformly among the feasible families. Raises InfeasibleQuestion when the given
    family has no well-posed question here.
    """
    if split not in (TRAIN, HELDOUT):
        raise ValueError(f"split must be {TRAIN!r} or {HELDOUT!r}, got {split!r}")
    if family is None:
        family = _pick(rng, feasible_families(scene))
    groups = _slot_groups(scene, family)
    if not groups:
        raise InfeasibleQuestion(f"no well-posed {family} question on this scene")
    return ask(scene, family, _pick(rng, _pick(rng, groups)), _pick(rng, templates(family, split)))


def rephrase_question(question: Question, rng: np.random.Generator) -> Question:
    """The same question (same slots, same answer) in a held-out template: the T-Gen prompt."""
    template = _pick(rng, templates(question.family, HELDOUT))
    return replace(question, text=template.fill(question.slots), template=template.key)


def answer_pool(family: str) -> tuple[str, ...]:
    """Every answer a family can give: its answer type."""
    return _family(family).answers


def counterfactual(answer: str, family: str, rng: np.random.Generator) -> str:
    """Another answer of the same type: another colour / shape / count word, or the opposite yes/no."""
    pool = answer_pool(family)
    if answer not in pool:
        raise ValueError(f"{answer!r} is not a {family} answer")
    return _pick(rng, [a for a in pool if a != answer])


def _phrase(size: str, color: str, shape: str) -> str:
    return f"a {size} {color} {shape}"


def caption_order(scene: Scene) -> list[int]:
    """Object indices left to right by box centre (ties: top to bottom): the caption's word order."""
    return sorted(range(len(scene.objects)), key=lambda k: (scene.objects[k].center[0], scene.objects[k].center[1]))


def caption(scene: Scene) -> str:
    """'a small red circle and a large blue square': objects left to right, joined with ' and '."""
    objs = scene.objects
    return CAPTION_JOINER.join(_phrase(objs[k].size, objs[k].color, objs[k].shape) for k in caption_order(scene))


def counterfactual_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The caption with exactly one attribute (size, colour or shape) of one object changed."""
    parts = [[scene.objects[k].size, scene.objects[k].color, scene.objects[k].shape] for k in caption_order(scene)]
    which = int(rng.integers(len(parts)))
    attribute = int(rng.integers(3))
    pool = (SIZES, tuple(COLORS), SHAPES)[attribute]
    parts[which][attribute] = _pick(rng, [v for v in pool if v != parts[which][attribute]])
    return CAPTION_JOINER.join(_phrase(*p) for p in parts)


def caption_prompt(rng: np.random.Generator | None = None, split: str = TRAIN) -> str:
    """The caption prompt: always "a photo of" for training; a random held-out paraphrase otherwise."""
    if split == TRAIN:
        return CAPTION_PROMPT
    if rng is None:
        raise ValueError("a held-out caption prompt is drawn at random: pass rng")
    return _pick(rng, templates(CAPTION_FAMILY, HELDOUT)).text
