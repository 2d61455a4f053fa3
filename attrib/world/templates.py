"""The paraphrase templates of every question family and of the caption prompt, as one table.

Which templates are for training and which are held out is data here and nowhere else. Three splits:

- ``train``: the phrasings the backbones learn and every ``src`` question is asked in;
- ``heldout``: the ``rephrase`` of training records (the T-Gen rows an editor may train on);
- ``heldout_eval``: the ``rephrase`` of dev / test records only, so T-Gen tests a phrasing that neither
  the backbones nor any editor ever trained on.

Slots: {shape}, {color}, {region}, and {a} ("a"/"an", agreeing with the next word).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TRAIN, HELDOUT, HELDOUT_EVAL = "train", "heldout", "heldout_eval"
SPLITS: tuple[str, ...] = (TRAIN, HELDOUT, HELDOUT_EVAL)


@dataclass(frozen=True)
class Template:
    """One paraphrase: `key` is stable ("<family>.<n>") so records and logs can name it."""

    key: str
    family: str
    split: str
    text: str

    def fill(self, slots: dict[str, str]) -> str:
        """The template with its slots filled; {a} becomes the article for the word after it."""
        values = dict(slots)
        if "{a}" in self.text:
            # The article agrees with whatever word the template puts right after it.
            follower = self.text.split("{a}", 1)[1].split()[0].format(**values)
            values["a"] = "an" if follower[:1] in "aeiou" else "a"
        return self.text.format(**values)

    def matches(self, text: str) -> bool:
        """Whether `text` is this template with some slot values filled in."""
        return _pattern(self.text).fullmatch(text) is not None


# family, split, text. Per VQA family one held-out row for training records' rephrases and one for dev /
# test records'; two held-out caption prompts for training records, one for dev / test.
_TABLE: tuple[tuple[str, str, str], ...] = (
    ("color_of_shape", TRAIN, "What color is the {shape}?"),
    ("color_of_shape", TRAIN, "Which color is the {shape}?"),
    ("color_of_shape", TRAIN, "What is the color of the {shape}?"),
    ("color_of_shape", TRAIN, "The {shape} is what color?"),
    ("color_of_shape", HELDOUT, "Tell me which color the {shape} has."),
    ("color_of_shape", HELDOUT_EVAL, "Say the color of the {shape} in this picture."),
    ("shape_of_color", TRAIN, "What shape is the {color} object?"),
    ("shape_of_color", TRAIN, "Which shape is the {color} object?"),
    ("shape_of_color", TRAIN, "What is the shape of the {color} object?"),
    ("shape_of_color", TRAIN, "The {color} object is what shape?"),
    ("shape_of_color", HELDOUT, "Tell me which shape the {color} thing has."),
    ("shape_of_color", HELDOUT_EVAL, "Say the shape of the {color} thing in this picture."),
    ("count", TRAIN, "How many objects are there?"),
    ("count", TRAIN, "How many objects are in the image?"),
    ("count", TRAIN, "What is the number of objects?"),
    ("count", TRAIN, "Count the objects in the image."),
    ("count", HELDOUT, "How many things can you see in this picture?"),
    ("count", HELDOUT_EVAL, "What number of things does this picture show?"),
    ("position", TRAIN, "What shape is in the {region}?"),
    ("position", TRAIN, "Which shape is in the {region}?"),
    ("position", TRAIN, "What is the shape of the object in the {region}?"),
    ("position", TRAIN, "The object in the {region} is what shape?"),
    ("position", HELDOUT, "Name the shape you see in the {region} of this picture."),
    ("position", HELDOUT_EVAL, "Say which shape sits in the {region} here."),
    ("exists", TRAIN, "Is there {a} {color} {shape}?"),
    ("exists", TRAIN, "Is there {a} {color} {shape} in the image?"),
    ("exists", TRAIN, "Does the image contain {a} {color} {shape}?"),
    ("exists", TRAIN, "Can you see {a} {color} {shape}?"),
    ("exists", HELDOUT, "Would you find {a} {color} {shape} somewhere in this picture?"),
    ("exists", HELDOUT_EVAL, "Does this picture show {a} {color} {shape} anywhere?"),
    ("caption", TRAIN, "a photo of"),
    ("caption", HELDOUT, "a picture of"),
    ("caption", HELDOUT, "an image of"),
    ("caption", HELDOUT_EVAL, "a drawing of"),
)
# What each slot can hold, for recognising a filled-in template.
_SLOT_PATTERNS = {"a": "an?", "shape": "[a-z]+", "color": "[a-z]+", "region": "[a-z]+ [a-z]+"}


def _pattern(template_text: str) -> re.Pattern:
    # Slots match the words they can hold (regions are two words); everything else literally.
    pieces = re.split(r"\{(\w+)\}", template_text)  # literal, slot, literal, slot, ..., literal
    return re.compile("".join(_SLOT_PATTERNS[p] if k % 2 else re.escape(p) for k, p in enumerate(pieces)))


def _build() -> tuple[Template, ...]:
    counts: dict[str, int] = {}
    rows = []
    for family, split, text in _TABLE:
        counts[family] = counts.get(family, 0) + 1
        rows.append(Template(f"{family}.{counts[family]}", family, split, text))
    return tuple(rows)


TEMPLATES: tuple[Template, ...] = _build()
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(t.family for t in TEMPLATES))


def templates(family: str, split: str) -> tuple[Template, ...]:
    """The templates of one family in one split ("train", "heldout" or "heldout_eval"), in table order."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return tuple(t for t in TEMPLATES if t.family == family and t.split == split)


def template_table() -> list[dict[str, str]]:
    """The whole table as plain rows (key, family, split, text), e.g. for a README or a metadata file."""
    return [{"key": t.key, "family": t.family, "split": t.split, "text": t.text} for t in TEMPLATES]


def match_template(text: str, family: str | None = None) -> Template | None:
    """The template (of `family`, or of any family) that `text` is a filling of, or None."""
    for t in TEMPLATES:
        if (family is None or t.family == family) and t.matches(text):
            return t
    return None
