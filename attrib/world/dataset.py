"""MMEdit-format datasets of the synthetic world (E-VQA- and E-IC-like), with ground-truth boxes.

`write_world(out_dir, seed)` writes, atomically (built in a hidden temp folder next to out_dir, renamed
at the end, so a killed run never leaves a folder that looks complete; `attrib.io.atomic_folder`, which
also refuses a second writer of the same folder):

    vqa_train.json  vqa_eval.json  caption_train.json  caption_eval.json   JSON lists, 11 string fields
    truth.json      {split: [{"family", "answer", "image", "image_rephrase", "m_loc",
                          "novel_target", "same_image"}, ...]}, same order
    meta.json       seed, counts, config, template table, box convention
    images/<split>/<index>.png, <index>_rephrase.png, <index>_mloc.png     64x64 RGB PNG (index: 6 digits)

Boxes are [x0, y0, x1, y1] in px, x1/y1 exclusive, or null where no single object is asked about
(count, exists answered "no", captions). Record i of a split comes from its own stream
`default_rng([seed, split_stream, i])`, so it does not depend on how many records are written; eval
scenes are additionally redrawn while their layout equals any training scene's layout.

Beyond the MMEdit fields, for measuring editors on dev / test data (eval splits):

- ``rephrase`` comes from the ``heldout_eval`` templates (training records use ``heldout``), so T-Gen is a
  phrasing no editor trained on;
- a share ``novel_share`` of eval VQA edits (drawn among the non-``exists`` ones, whose answers are
  yes / no) gets a *novel target*: a colour, shape or count word that no world text contains
  (`NOVEL_WORDS`), several tokens under the world tokenizer; truth.json marks them ``novel_target``;
- ``same_image`` (every split): up to `SAME_IMAGE_QUESTIONS` other questions about the edit's own image
  that the edit must not change — none names the edited object, an attribute value the edit involves, or
  (for count edits) the count — with their true answers.

These draws come from their own streams ``default_rng([seed, split_stream, i, k])``, so the MMEdit fields
the earlier draws made are the same with or without them.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attrib.io import atomic_folder, atomic_write_json

from .facts import FACTS
from .questions import (
    CAPTION_FAMILY,
    CAPTION_JOINER,
    CAPTION_PROMPT,
    VQA_FAMILIES,
    InfeasibleQuestion,
    Question,
    caption,
    caption_order,
    caption_prompt,
    counterfactual,
    counterfactual_caption,
    evaluate,
    rephrase_question,
    sample_question,
)
from .scene import Box, Scene, WorldConfig, generate_scene, render
from .templates import HELDOUT, HELDOUT_EVAL, TRAIN, template_table, templates
from .variants import caption_variant, question_variant

SPLITS: tuple[str, ...] = ("vqa_train", "vqa_eval", "caption_train", "caption_eval")
_SPLIT_STREAM = {"vqa_train": 1, "vqa_eval": 2, "caption_train": 3, "caption_eval": 4}
FIELDS: tuple[str, ...] = (
    "src", "pred", "rephrase", "alt", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a"
)
IMAGE_ROLES: tuple[str, ...] = ("image", "image_rephrase", "m_loc")
# Answer words of no world text (not in COLORS / SHAPES / COUNT_WORDS, nor in any template or fact).
NOVEL_WORDS: dict[str, tuple[str, ...]] = {
    "color_of_shape": ("violet", "turquoise", "maroon", "crimson"),
    "shape_of_color": ("hexagon", "pentagon", "crescent", "octagon"),
    "position": ("hexagon", "pentagon", "crescent", "octagon"),
    "count": ("five", "six", "seven", "eight"),
}
NOVEL_SHARE = 1 / 3  # default share of dev / test VQA edits with a novel target
MAX_NOVEL_SHARE = 0.8  # the share of VQA edits in the families of NOVEL_WORDS
SAME_IMAGE_QUESTIONS = 3
_NOVEL_STREAM, _SAME_IMAGE_STREAM = 1, 2  # sub-streams of a record's own stream (module docstring)


@dataclass
class WorldRecord:
    """One MMEdit record plus what produced it.

    fields: the 11 MMEdit string fields; scenes / boxes: per image role ("image", "image_rephrase",
    "m_loc") the scene and the pixel box of the asked-about object (None where there is none);
    question: the edit question (None for captions); m_loc_question: the M-Loc question; novel_target:
    ``alt`` is a novel word; same_image: questions about the edit image the edit must not change.
    """

    split: str
    index: int
    family: str
    fields: dict[str, str]
    scenes: dict[str, Scene]
    boxes: dict[str, Box | None]
    question: Question | None
    m_loc_question: Question
    novel_target: bool = False
    same_image: list[Question] = field(default_factory=list)

    def truth(self) -> dict:
        """The truth.json entry: family, true answer, one box (list or None) per image role, whether the
        target is novel, and the same-image questions with their answers."""
        entry: dict = {"family": self.family, "answer": self.fields["pred"]}
        for role in IMAGE_ROLES:
            box = self.boxes[role]
            entry[role] = None if box is None else list(box)
        entry["novel_target"] = self.novel_target
        entry["same_image"] = [{"family": q.family, "question": q.text, "answer": q.answer} for q in self.same_image]
        return entry


def image_paths(split: str, index: int) -> dict[str, str]:
    """Relative PNG path of each image role of record `index` in `split`."""
    stem = f"images/{split}/{index:06d}"
    return {"image": f"{stem}.png", "image_rephrase": f"{stem}_rephrase.png", "m_loc": f"{stem}_mloc.png"}


def _scene_for(
    rng: np.random.Generator, config: WorldConfig, family: str, avoid: frozenset
) -> tuple[Scene, Question | None]:
    """A scene whose layout is not in `avoid`, with a training-template question of `family` on it
    (no question for captions). The object count is drawn once and kept while redrawing, so rejected
    scenes (ill-posed family, layout seen in training) do not skew the count distribution."""
    n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _ in range(1000):
        scene = generate_scene(rng, config, n_objects=n_objects)
        if scene.layout_key() in avoid:
            continue
        if family == CAPTION_FAMILY:
            return scene, None
        try:
            return scene, sample_question(scene, rng, family, TRAIN)
        except InfeasibleQuestion:
            continue
    raise RuntimeError(f"no {n_objects}-object scene found for family {family!r} in 1000 draws")


def _involved(record_question: Question | None, scene: Scene, edited: int | None, changed: set[str]) -> set[str]:
    """Slot values a same-image question must not name: the edit's slots, the words its target changes and
    the edited object's colour and shape."""
    words = set(changed)
    if record_question is not None:
        words |= set(record_question.slots.values()) | {record_question.answer}
    if edited is not None:
        words |= {scene.objects[edited].color, scene.objects[edited].shape}
    return words


def same_image_questions(scene: Scene, rng: np.random.Generator, edit_family: str, edited: int | None,
                         involved: set[str], n: int = SAME_IMAGE_QUESTIONS) -> list[Question]:
    """Up to ``n`` distinct training-template questions about ``scene`` that an edit of object ``edited``
    (None: no single object) in family ``edit_family`` must leave alone (module docstring)."""
    out: list[Question] = []
    for _ in range(10 * n):
        if len(out) == n:
            break
        family = VQA_FAMILIES[int(rng.integers(len(VQA_FAMILIES)))]
        if family == "count" and edit_family == "count":
            continue
        try:
            question = sample_question(scene, rng, family, TRAIN)
        except InfeasibleQuestion:
            continue
        if edited is not None and question.target == edited:
            continue
        asked = (question.family, sorted(question.slots.items()))
        if involved & set(question.slots.values()) or any((q.family, sorted(q.slots.items())) == asked for q in out):
            continue  # names what the edit changes, or asks what another question already asks
        out.append(question)
    return out


def _edited_caption_object(scene: Scene, before: str, after: str) -> int | None:
    """The object whose phrase differs between the true and the counterfactual caption."""
    changed = [k for k, (a, b) in enumerate(zip(before.split(CAPTION_JOINER), after.split(CAPTION_JOINER))) if a != b]
    return caption_order(scene)[changed[0]] if len(changed) == 1 else None


def _eval_extras(seed: int, split: str, index: int, record: WorldRecord, novel_share: float) -> WorldRecord:
    """The dev / test rephrase and novel target of an eval record (module docstring)."""
    if record.question is not None:
        template = templates(record.family, HELDOUT_EVAL)[0]
        record.fields["rephrase"] = template.fill(record.question.slots)
    else:
        record.fields["rephrase"] = templates(CAPTION_FAMILY, HELDOUT_EVAL)[0].text
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index, _NOVEL_STREAM])
    draw, pick = rng.random(), int(rng.integers(1 << 30))  # both drawn always: stable across shares
    # novel_share is of all VQA edits; only the families in NOVEL_WORDS can take one.
    if record.family in NOVEL_WORDS and draw < novel_share * len(VQA_FAMILIES) / len(NOVEL_WORDS):
        words = NOVEL_WORDS[record.family]
        record.fields["alt"] = words[pick % len(words)]
        record.novel_target = True
    return record


def make_record(
    seed: int, split: str, index: int, config: WorldConfig = WorldConfig(), avoid: frozenset = frozenset(),
    novel_share: float = NOVEL_SHARE,
) -> WorldRecord:
    """Record `index` of `split`; deterministic in (seed, split, index, config, avoid, novel_share).

    VQA records cycle through the families by index so every family is equally common.
    """
    record = _base_record(seed, split, index, config, avoid)
    scene = record.scenes["image"]
    if record.question is not None:
        edited = record.question.target
    else:
        edited = _edited_caption_object(scene, record.fields["pred"], record.fields["alt"])
    changed_words = set(record.fields["alt"].split()) ^ set(record.fields["pred"].split())
    involved = _involved(record.question, scene, edited, changed_words)
    if split.endswith("eval"):
        record = _eval_extras(seed, split, index, record, novel_share)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index, _SAME_IMAGE_STREAM])
    record.same_image = same_image_questions(scene, rng, record.family, edited, involved | {record.fields["alt"]})
    return record


def _base_record(seed: int, split: str, index: int, config: WorldConfig, avoid: frozenset) -> WorldRecord:
    """The MMEdit fields, scenes and questions of record `index` from its own stream."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    if split.startswith("vqa"):
        family = VQA_FAMILIES[index % len(VQA_FAMILIES)]
        scene, question = _scene_for(rng, config, family, avoid)
        assert question is not None
        variant = question_variant(scene, question, rng, config)
        kept = evaluate(variant, family, question.slots)
        if kept != (question.answer, question.target):  # question_variant guarantees it; a bug otherwise
            raise AssertionError(f"variant changed the answer of {question.text!r}: {kept}")
        text = {
            "src": question.text,
            "pred": question.answer,
            "rephrase": rephrase_question(question, rng).text,
            "alt": counterfactual(question.answer, family, rng),
        }
        boxes = {"image": question.box(scene), "image_rephrase": question.box(variant)}
    else:
        family, question = CAPTION_FAMILY, None
        scene, _ = _scene_for(rng, config, family, avoid)
        variant = caption_variant(scene, rng, config)
        text = {
            "src": CAPTION_PROMPT,
            "pred": caption(scene),
            "rephrase": caption_prompt(rng, HELDOUT),
            "alt": counterfactual_caption(scene, rng),
        }
        boxes = {"image": None, "image_rephrase": None}
    # M-Loc asks a question of another family on another scene.
    others = [f for f in VQA_FAMILIES if f != family]
    m_scene, m_question = _scene_for(rng, config, others[int(rng.integers(len(others)))], frozenset())
    assert m_question is not None
    fact = FACTS[int(rng.integers(len(FACTS)))]
    paths = image_paths(split, index)
    fields = {
        **text,
        "image": paths["image"],
        "image_rephrase": paths["image_rephrase"],
        "loc": fact.question,
        "loc_ans": fact.answer,
        "m_loc": paths["m_loc"],
        "m_loc_q": m_question.text,
        "m_loc_a": m_question.answer,
    }
    fields = {name: fields[name] for name in FIELDS}  # fixed field order in the JSON
    boxes["m_loc"] = m_question.box(m_scene)
    scenes = {"image": scene, "image_rephrase": variant, "m_loc": m_scene}
    return WorldRecord(split, index, family, fields, scenes, boxes, question, m_question)


def build_split(
    seed: int, split: str, n: int, config: WorldConfig = WorldConfig(), avoid: frozenset = frozenset(),
    novel_share: float = NOVEL_SHARE,
) -> list[WorldRecord]:
    """Records 0..n-1 of a split, in memory (scenes, not images)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return [make_record(seed, split, i, config, avoid, novel_share) for i in range(n)]


def _write_split(root: Path, split: str, records: list[WorldRecord]) -> None:
    """The split's PNGs and JSON file into ``root``, the world's temporary folder (`atomic_folder`)."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    for record in records:
        for role in IMAGE_ROLES:
            render(record.scenes[role]).save(root / record.fields[role], format="PNG")
    atomic_write_json(root / f"{split}.json", [r.fields for r in records], indent=1)


def write_world(
    out_dir: str | os.PathLike,
    seed: int,
    n_train: int = 3000,
    n_eval: int = 1000,
    n_caption_train: int = 1000,
    n_caption_eval: int = 300,
    config: WorldConfig = WorldConfig(),
    overwrite: bool = False,
    novel_share: float = NOVEL_SHARE,
) -> Path:
    """Write the four MMEdit JSON files, truth.json, meta.json and the PNGs to `out_dir`; return its path.

    Raises FileExistsError if out_dir exists and is not empty (unless overwrite), ValueError on a
    negative seed or count, OSError (e.g. PermissionError) when the parent folder is not writable.
    """
    counts = {"vqa_train": n_train, "vqa_eval": n_eval, "caption_train": n_caption_train,
              "caption_eval": n_caption_eval}
    if seed < 0 or any(n < 0 for n in counts.values()):
        raise ValueError(f"seed and counts must be >= 0, got seed={seed}, counts={counts}")
    if not 0.0 <= novel_share <= MAX_NOVEL_SHARE:
        raise ValueError(f"novel_share must be in [0, {MAX_NOVEL_SHARE}] (exists edits answer yes / no), "
                         f"got {novel_share}")
    out = Path(out_dir)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (use overwrite / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out, replace=overwrite) as tmp:
        truth: dict[str, list] = {}
        train_layouts: set = set()
        # Training splits first, so eval scenes can avoid every training layout.
        for split in ("vqa_train", "caption_train", "vqa_eval", "caption_eval"):
            avoid = frozenset(train_layouts) if split.endswith("eval") else frozenset()
            records = build_split(seed, split, counts[split], config, avoid, novel_share)
            if split.endswith("train"):
                train_layouts.update(r.scenes["image"].layout_key() for r in records)
            _write_split(tmp, split, records)
            truth[split] = [r.truth() for r in records]
        atomic_write_json(tmp / "truth.json", {split: truth[split] for split in SPLITS}, indent=1)
        meta = {
            "seed": seed,
            "counts": counts,
            "config": asdict(config),
            "novel_share": novel_share,
            "box_format": "[x0, y0, x1, y1] in pixels, x1/y1 exclusive; null = no single object asked about",
            "templates": template_table(),
        }
        atomic_write_json(tmp / "meta.json", meta, indent=1)
    return out
