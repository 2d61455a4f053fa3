"""The lifelong protocol's pre-edit rows, computed by the first method of a comparison and read by the others.

    pre, how = shared_pre_edit(editor, test_records, n_live=100, folder=out / "pre-edit")
    evaluate_sequential(editor, test_records, 100, pre=pre)      # how: "computed" or "shared"

Step 2 of `editing.evaluation.sequential` (the unedited T-Loc, M-Loc and same-image rows of every scored
record, in the blocks that score them) does not depend on the method: every editor holds no edit after
``restore()``. A comparison runs each method in a process of its own, so without a cache each of them
computes the same rows again (on the BLIP-2 default, ~45 s a method for N = 1, 10, 100, 1,000).

The file ``<folder>/<N>.safetensors`` holds each record's rows (``<record>.<row>.<field>`` for the
`RowPredictions` fields) and a key: the backbone's fingerprint, the records' fields and same-image
questions, the locality prompt formats, N, `sequential.BLOCK`, the torch version and thread count. A method
reads the file only when the key matches and its own restored model gives the cached rows to the bit on the
blocks of the first `sequential.BLOCK` records, recomputed here; otherwise it computes its own rows (and
writes them when the key differed). So a method whose unedited forward differed from the first method's
in any bit on those blocks is scored against its own pre-edit rows, as without the cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from attrib.data import EditRecord
from attrib.errors import ArtifactError
from attrib.io import atomic_write, read_safetensors
from attrib.prompts import load_prompts
from editing.editor import Editor
from editing.evaluation import sequential
from editing.evaluation.evaluate import same_image_questions
from editing.evaluation.metrics import RowPredictions
from editing.evaluation.sequential import PreEdit

FIELDS = ("labels", "answer_top", "sequence_top")


def pre_edit_key(editor: Editor, records: Sequence[EditRecord], n_live: int, formats: dict[str, str]) -> str:
    """What cached pre-edit rows must have been computed from to be read (module docstring)."""
    content = [(str(r.source), r.index, r.fields, same_image_questions(r)) for r in records]
    text = json.dumps([editor.backbone.fingerprint(), content, {k: formats[k] for k in ("loc", "m_loc")}, n_live,
                       sequential.BLOCK, torch.__version__, torch.get_num_threads()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_pre_edit(pre: PreEdit, path: Path, key: str) -> None:
    tensors = {f"{i}.{j}.{field}": getattr(row, field).clone()  # rows may share storage, which safetensors refuses
               for i, rows in enumerate(pre.rows) for j, row in enumerate(rows) for field in FIELDS}
    counts = json.dumps([len(rows) for rows in pre.rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key, "n_live": str(pre.n_live),
                                                                     "rows": counts}))


def load_pre_edit(path: Path, key: str) -> PreEdit | None:
    """The cached rows, or None when the file was computed from other inputs (key); a damaged file raises
    `ArtifactError` naming it."""
    tensors, metadata = read_safetensors(path, "pre-edit rows cache")
    if metadata.get("key") != key:
        return None
    try:
        counts = json.loads(metadata["rows"])
        rows = [[RowPredictions(*(tensors[f"{i}.{j}.{field}"] for field in FIELDS)) for j in range(count)]
                for i, count in enumerate(counts)]
        return PreEdit(int(metadata["n_live"]), rows)
    except (KeyError, ValueError, TypeError) as error:
        raise ArtifactError(f"{path}: pre-edit rows cache lacks {error}; delete it to compute the rows again") from None


def same_rows(a: Sequence[Sequence[RowPredictions]], b: Sequence[Sequence[RowPredictions]]) -> bool:
    """Whether two records' lists of rows hold equal tensors (every field, every row)."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all(torch.equal(getattr(r, f), getattr(s, f)) for r, s in zip(x, y) for f in FIELDS)
        for x, y in zip(a, b))


def shared_pre_edit(editor: Editor, records: Sequence[EditRecord], n_live: int, folder: Path | None,
                    prompts: dict[str, str] | None = None, progress: bool = False) -> tuple[PreEdit, str]:
    """(`sequential.pre_edit_locality`'s rows for ``n_live``, "shared" when read from ``folder``, else
    "computed"); computed rows are written to ``folder`` when it has none for these inputs (module docstring).
    ``folder`` None: always computed, nothing written."""
    formats = prompts or load_prompts()
    if folder is None:
        return sequential.pre_edit_locality(editor, records, n_live, formats, progress), "computed"
    path = Path(folder) / f"{n_live}.safetensors"
    key = pre_edit_key(editor, records, n_live, formats)
    cached = load_pre_edit(path, key) if path.is_file() else None
    if cached is not None:
        editor.restore()
        first = [block for block in sequential.blocks(len(records), n_live) if block.start < sequential.BLOCK]
        own = [rows for block in first for rows in sequential._locality(editor, [records[p] for p in block], formats)]
        if same_rows(own, [cached.rows[p] for block in first for p in block]):
            return cached, "shared"
    pre = sequential.pre_edit_locality(editor, records, n_live, formats, progress)
    if cached is None:
        save_pre_edit(pre, path, key)
    return pre, "computed"
