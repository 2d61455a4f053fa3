"""MMEdit-format datasets of the synthetic world (E-VQA- and E-IC-like), with ground-truth boxes.

`write_world(out_dir, seed)` writes, atomically (built in a hidden temp folder next to out_dir, renamed
at the end, so a killed run never leaves a folder that looks complete):

    vqa_train.json  vqa_eval.json  caption_train.json  caption_eval.json   JSON lists, 11 string fields
    truth.json      {split: [{"family", "answer", "image", "image_rephrase", "m_loc"}, ...]}, same order
    meta.json       seed, counts, config, template table, box convention
    images/<split>/<index>.png, <index>_rephrase.png, <index>_mloc.png     64x64 RGB PNG (index: 6 digits)

Boxes are [x0, y0, x1, y1] in px, x1/y1 exclusive, or null where no single object is asked about
(count, exists answered "no", captions). Record i of a split comes from its own stream
`default_rng([seed, split_stream, i])`, so it does not depend on how many records are written; eval
scenes are additionally redrawn while their layout equals any training scene's layout.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .facts import FACTS
from .questions import (
    CAPTION_FAMILY,
    CAPTION_PROMPT,
    VQA_FAMILIES,
    InfeasibleQuestion,
    Question,
    caption,
    caption_prompt,
    counterfactual,
    counterfactual_caption,
    evaluate,
    rephrase_question,
    sample_question,
)
from .scene import Box, Scene, WorldConfig, generate_scene, render
from .templates import HELDOUT, TRAIN, template_table
from .variants import caption_variant, question_variant

SPLITS: tuple[str, ...] = ("vqa_train", "vqa_eval", "caption_train", "caption_eval")
_SPLIT_STREAM = {"vqa_train": 1, "vqa_eval": 2, "caption_train": 3, "caption_eval": 4}
FIELDS: tuple[str, ...] = (
    "src", "pred", "rephrase", "alt", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a"
)
IMAGE_ROLES: tuple[str, ...] = ("image", "image_rephrase", "m_loc")


@dataclass
class WorldRecord:
    """One MMEdit record plus what produced it.

    fields: the 11 MMEdit string fields; scenes / boxes: per image role ("image", "image_rephrase",
    "m_loc") the scene and the pixel box of the asked-about object (None where there is none);
    question: the edit question (None for captions); m_loc_question: the M-Loc question.
    """

    split: str
    index: int
    family: str
    fields: dict[str, str]
    scenes: dict[str, Scene]
    boxes: dict[str, Box | None]
    question: Question | None
    m_loc_question: Question

    def truth(self) -> dict:
        """The truth.json entry: family, true answer, and one box (list or None) per image role."""
        entry: dict = {"family": self.family, "answer": self.fields["pred"]}
        for role in IMAGE_ROLES:
            box = self.boxes[role]
            entry[role] = None if box is None else list(box)
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


def make_record(
    seed: int, split: str, index: int, config: WorldConfig = WorldConfig(), avoid: frozenset = frozenset()
) -> WorldRecord:
    """Record `index` of `split`; deterministic in (seed, split, index, config, avoid).

    VQA records cycle through the families by index so every family is equally common.
    """
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
    seed: int, split: str, n: int, config: WorldConfig = WorldConfig(), avoid: frozenset = frozenset()
) -> list[WorldRecord]:
    """Records 0..n-1 of a split, in memory (scenes, not images)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return [make_record(seed, split, i, config, avoid) for i in range(n)]


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_split(root: Path, split: str, records: list[WorldRecord]) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    for record in records:
        for role in IMAGE_ROLES:
            render(record.scenes[role]).save(root / record.fields[role], format="PNG")
    _write_json(root / f"{split}.json", [r.fields for r in records])


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp folder to `out`, replacing an empty folder or (with overwrite) any."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} appeared while writing; not replacing it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
        return
    os.rename(tmp, out)


def write_world(
    out_dir: str | os.PathLike,
    seed: int,
    n_train: int = 3000,
    n_eval: int = 1000,
    n_caption_train: int = 1000,
    n_caption_eval: int = 300,
    config: WorldConfig = WorldConfig(),
    overwrite: bool = False,
) -> Path:
    """Write the four MMEdit JSON files, truth.json, meta.json and the PNGs to `out_dir`; return its path.

    Raises FileExistsError if out_dir exists and is not empty (unless overwrite), ValueError on a
    negative seed or count, OSError (e.g. PermissionError) when the parent folder is not writable.
    """
    counts = {"vqa_train": n_train, "vqa_eval": n_eval, "caption_train": n_caption_train,
              "caption_eval": n_caption_eval}
    if seed < 0 or any(n < 0 for n in counts.values()):
        raise ValueError(f"seed and counts must be >= 0, got seed={seed}, counts={counts}")
    out = Path(out_dir)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (use overwrite / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
        truth: dict[str, list] = {}
        train_layouts: set = set()
        # Training splits first, so eval scenes can avoid every training layout.
        for split in ("vqa_train", "caption_train", "vqa_eval", "caption_eval"):
            avoid = frozenset(train_layouts) if split.endswith("eval") else frozenset()
            records = build_split(seed, split, counts[split], config, avoid)
            if split.endswith("train"):
                train_layouts.update(r.scenes["image"].layout_key() for r in records)
            _write_split(tmp, split, records)
            truth[split] = [r.truth() for r in records]
        _write_json(tmp / "truth.json", {split: truth[split] for split in SPLITS})
        meta = {
            "seed": seed,
            "counts": counts,
            "config": asdict(config),
            "box_format": "[x0, y0, x1, y1] in pixels, x1/y1 exclusive; null = no single object asked about",
            "templates": template_table(),
        }
        _write_json(tmp / "meta.json", meta)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
