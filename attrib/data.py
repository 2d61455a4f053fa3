"""MMEdit-format edit datasets (E-VQA / E-IC, and the synthetic world's), loaded lazily.

A file is a JSON list of records, each with 11 string fields (`FIELDS`; docs/data.md says what each
holds): the edit (``src`` prompt, ``alt`` new target, ``image``), its generality probes (``rephrase``,
``image_rephrase``), its locality probes (``loc`` / ``loc_ans`` text-only, ``m_loc`` / ``m_loc_q`` /
``m_loc_a`` another image), and ``pred`` (the original output, unused). Images are paths relative to an
image root the user gives and are opened only when asked for (E-VQA train pre-loaded would need ~28 GiB).
Every error names the file, the record index and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from attrib.errors import DataError
from attrib.io import inside_root, open_image

FIELDS = ("src", "pred", "rephrase", "alt", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q",
          "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")


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
        return inside_root(self.image_root, self.fields[field], self.where(field))

    def load_image(self, field: str = "image") -> Image.Image:
        """The RGB image of ``field``; a missing, unreadable or oversized file raises a one-line DataError
        (the pixel limit is checked from the header, before decoding: `attrib.io.open_image`)."""
        return open_image(self.image_path(field), self.where(field))

    def box(self, field: str = "image"):
        """Ground-truth box [x0, y0, x1, y1] of the asked-about object in ``field``'s image, or None."""
        return None if self.truth is None else self.truth.get(field)


def load_records(path: str | Path, image_root: str | Path | None = None, n: int | None = None,
                 truth_split: str | None = None) -> list[EditRecord]:
    """The first ``n`` records of an MMEdit JSON file (all when ``n`` is None), fields checked.

    ``image_root`` defaults to the file's folder. World files come with ``truth.json`` beside them; its
    split (``truth_split``, default: the file's stem, e.g. "vqa_eval") is attached to each record.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    if n is not None and n > len(records):
        raise DataError(f"{path}: N={n} is larger than the dataset ({len(records)} records)")
    records = records[:n] if n is not None else records
    truth_file = path.parent / "truth.json"
    truth = None
    if truth_file.is_file():
        truth = json.loads(truth_file.read_text()).get(truth_split or path.stem)
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
        for field in FIELDS:
            if field not in record:
                raise DataError(f"{path}: record {index}: missing field {field!r}")
            if not isinstance(record[field], str):
                raise DataError(f"{path}: record {index}, field {field!r}: expected a string, found "
                                f"{type(record[field]).__name__}")
        out.append(EditRecord(index, {f: record[f] for f in FIELDS}, path, root,
                              truth[index] if truth is not None and index < len(truth) else None))
    return out
