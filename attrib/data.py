"""MMEdit-format edit datasets (E-VQA / E-IC, and the synthetic world's), loaded lazily.

A file is a JSON list of records, each with 11 string fields (`FIELDS`; docs/data.md says what each
holds): the edit (``src`` prompt, ``alt`` new target, ``image``), its generality probes (``rephrase``,
``image_rephrase``), its locality probes (``loc`` / ``loc_ans`` text-only, ``m_loc`` / ``m_loc_q`` /
``m_loc_a`` another image), and ``pred`` (the original output, unused). Images are paths relative to an
image root the user gives and are opened only when asked for (E-VQA train pre-loaded would need ~28 GiB).

These files come from strangers, so every reader refuses bad input with a one-line `DataError` that names
the file, the record index and the field: the JSON through `attrib.io.read_json` (size limit, UTF-8),
image paths through `attrib.io.inside_root` (no ``..``, absolute path or symlink out of the image root),
images through `attrib.io.open_image` (pixel limit read from the header, before decoding), and
``truth.json`` checked entry by entry. `check_prompt_length` refuses a prompt longer than the language
model's context instead of letting it be truncated or overflow the position table.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from attrib.errors import DataError, VisEditError
from attrib.io import image_size, inside_root, open_image, read_json, require

if TYPE_CHECKING:
    from attrib.backbones.loader import Backbone

FIELDS = ("src", "pred", "rephrase", "alt", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q",
          "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
TRUTH_FILE = "truth.json"
# Optional per-record truth fields (older world folders lack the last two) and the type each must have.
TRUTH_TYPES = {"family": str, "answer": str, "novel_target": bool, "same_image": list}
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # control characters and line separators


@dataclass(frozen=True)
class EditRecord:
    """One MMEdit record; ``fields`` holds the 11 strings, ``truth`` the world's boxes when known."""

    index: int
    fields: dict[str, str]
    source: Path
    image_root: Path
    truth: dict | None = None

    def __getattr__(self, name: str) -> str:
        if name in FIELDS:
            return self.fields[name]
        raise AttributeError(name)

    def where(self, field: str) -> str:
        """"<file>: record <i>, field '<field>'" — how every error about this record starts."""
        return f"{self.source}: record {self.index}, field {field!r}"

    def image_path(self, field: str = "image") -> Path:
        """The image file of ``field``, refused (DataError) when its path leaves the image root."""
        relative = self.fields[field]
        try:
            return inside_root(self.image_root, relative, self.where(field))
        except VisEditError:
            raise
        except (ValueError, OSError) as error:  # a name the file system cannot take
            raise DataError(f"{self.where(field)}: unusable image path {relative!r} "
                            f"({type(error).__name__})") from None

    def load_image(self, field: str = "image") -> Image.Image:
        """The RGB image of ``field``; a missing, unreadable or oversized file raises a one-line DataError
        (the pixel limit is checked from the header, before decoding: `attrib.io.open_image`)."""
        return open_image(self.image_path(field), self.where(field))

    def image_size(self, field: str = "image") -> tuple[int, int]:
        """(width, height) of ``field``'s image from its header alone, refused as `load_image` refuses it."""
        return image_size(self.image_path(field), self.where(field))

    def box(self, field: str = "image"):
        """Ground-truth box [x0, y0, x1, y1] of the asked-about object in ``field``'s image, or None."""
        return None if self.truth is None else self.truth.get(field)


def load_records(path: str | Path, image_root: str | Path | None = None, n: int | None = None,
                 truth_split: str | None = None) -> list[EditRecord]:
    """The first ``n`` records of an MMEdit JSON file (all when ``n`` is None), fields checked.

    ``image_root`` defaults to the file's folder. World files come with ``truth.json`` beside them; its
    split (``truth_split``, default: the file's stem, e.g. "vqa_eval") is attached to each record, and
    must have one entry per record of the file. A file whose stem is no split of ``truth.json`` (the user's
    own subset, say) gets no truth; a ``truth_split`` that is missing is an error.
    """
    path = Path(path)
    records = read_json(path, "JSON list of MMEdit records", error=DataError)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {_kind(records)}")
    if n is not None and not 0 <= n <= len(records):
        raise DataError(f"{path}: N={n} is larger than the dataset ({len(records)} records)" if n > 0
                        else f"{path}: N={n}; expected a number of records from 0 to {len(records)}")
    truth = None
    truth_file = path.parent / TRUTH_FILE
    if truth_file.is_file():
        truth = load_truth(truth_file, truth_split or path.stem, len(records), path, required=truth_split is not None)
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for index, record in enumerate(records[:n] if n is not None else records):
        where = f"{path}: record {index}"
        fields = {field: require(record, field, str, where, DataError) for field in FIELDS}
        for field in IMAGE_FIELDS:
            _check_path_text(fields[field], f"{where}, field {field!r}")
        out.append(EditRecord(index, fields, path, root, truth[index] if truth is not None else None))
    return out


def _check_path_text(text: str, where: str) -> None:
    """Refuse an image path with control characters or characters no file name can hold, up front:
    later messages print the path, and the file system would fail on it with a bare error."""
    if _CONTROL.search(text):
        raise DataError(f"{where}: control character in image path {text!r}")
    try:
        os.fsencode(text)
    except UnicodeError:
        raise DataError(f"{where}: image path {text!r} cannot be a file name (unpaired surrogate)") from None


def load_truth(path: str | Path, split: str, n_records: int, records_file: str | Path = "the records file",
               required: bool = True) -> list[dict | None] | None:
    """The ``split`` entries of a world's ``truth.json``: one per record (an object or null), each box
    [x0, y0, x1, y1] (4 finite numbers) or null. A split that is absent gives None unless ``required``;
    anything malformed raises a one-line DataError naming truth.json, the split, the index and the field."""
    path = Path(path)
    data = read_json(path, "truth.json (split → one entry per record)", error=DataError)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object of splits (split → list of entries), found {_kind(data)}")
    if split not in data:
        if not required:
            return None
        names = ", ".join(repr(name) for name in list(data)[:8])
        raise DataError(f"{path}: no split {split!r} (it has {names or 'none'})")
    entries = data[split]
    if not isinstance(entries, list):
        raise DataError(f"{path}: split {split!r}: expected a list of per-record entries, found {_kind(entries)}")
    if len(entries) != n_records:
        raise DataError(f"{path}: split {split!r} has {len(entries)} entries for the {n_records} records of "
                        f"{records_file}; truth.json belongs to other records")
    for index, entry in enumerate(entries):
        if entry is not None:
            _check_truth_entry(entry, f"{path}: split {split!r}, record {index}")
    return entries


def _check_truth_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object or null, found {_kind(entry)}")
    for field in IMAGE_FIELDS:
        box = entry.get(field)
        if box is None:
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(_finite_number(v) for v in box)):
            raise DataError(f"{where}, field {field!r}: expected a box [x0, y0, x1, y1] of 4 finite numbers "
                            f"or null, found {_kind(box)}")
    for field, kind in TRUTH_TYPES.items():
        require(entry, field, kind, where, DataError, default=None)
    if entry.get("image") is not None:  # boxed records are scored against their true answer
        require(entry, "answer", str, where, DataError)
    for number, question in enumerate(entry.get("same_image") or []):
        at = f"{where}, field 'same_image', item {number}"
        require(question, "question", str, at, DataError)
        require(question, "answer", str, at, DataError)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    """How a message names what it found: the JSON type, and the length of a list."""
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return {dict: "an object", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def prompt_length(backbone: Backbone, prompt: str, target: str | None = None, with_image: bool = True) -> int:
    """Positions the language model sees for ``template(prompt)`` (+ ``" " + target``) with one image:
    the text's tokens, its image placeholder counted as the backbone's ``n_visual_tokens`` image tokens
    (BLIP-2's processor puts them in front of a text that has none)."""
    text = backbone.format_prompt(prompt, with_image=with_image)
    if target is not None:
        text = f"{text} {target}"
    ids = backbone.tokenizer(text).input_ids
    if not with_image:
        return len(ids)
    return len(ids) - ids.count(backbone.image_token_id) + backbone.n_visual_tokens


def context_length(backbone: Backbone) -> int | None:
    """The language model's context: ``text_config.max_position_embeddings`` (None when not stated)."""
    text_config = getattr(backbone.config, "text_config", None)
    return getattr(text_config, "max_position_embeddings", None)


def check_prompt_length(backbone: Backbone, record: EditRecord, field: str, prompt: str,
                        target: str | None = None, with_image: bool = True) -> int:
    """`prompt_length`, refused with a DataError naming file, record and ``field`` when it exceeds the
    model's `context_length` (the prompt is never truncated: the scored positions would be wrong)."""
    length = prompt_length(backbone, prompt, target, with_image)
    limit = context_length(backbone)
    if limit is not None and length > limit:
        parts = "prompt" + (", target" if target is not None else "") + (" and image tokens" if with_image else "")
        raise DataError(f"{record.where(field)}: {parts} take {length} positions, more than the language "
                        f"model's {limit} (max_position_embeddings); shorten the text, it is not truncated")
    return length
