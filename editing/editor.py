"""The interface every editing method meets, and the edit request it takes.

An editor holds a backbone and changes what it answers: ``edit(request)`` applies one edit (the image,
the prompt and the new target), every forward of ``editor.backbone`` afterwards sees it, and
``restore()`` brings the unedited model back bit for bit. Methods that learn
from data (adapters, hypernetworks, classifiers) do it once in ``prepare(train, dev)`` before any edit.
The evaluation (`editing.evaluation`) and the commands (`editing.command`) use nothing else, so a new
method is one class implementing `Editor` plus a line in `editing.methods.METHODS`.

    editor.edit(EditRequest(image, "What color is the square? The answer is:", "green"))
    logits = editor.backbone.forward(editor.backbone.encode([image], [prompt])).logits   # edited
    editor.restore()                                                                      # unedited again
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

from attrib.backbones.loader import Backbone
from attrib.data import EditRecord
from attrib.prompts import load_prompts


@dataclass(frozen=True)
class EditRequest:
    """One edit: the image, the prompt in the dataset's format (before the backbone template) and the
    new target."""

    image: Image.Image = field(repr=False)
    prompt: str
    target: str

    @classmethod
    def from_record(cls, record: EditRecord, task: str = "vqa", prompts: dict[str, str] | None = None) -> "EditRequest":
        """The edit of an MMEdit record: (``image``, format[task](``src``), ``alt``)."""
        formats = prompts or load_prompts()
        return cls(record.load_image("image"), formats[task].format(src=record.src), record.alt)


class Editor(ABC):
    """A backbone and a way to edit it (module docstring).

    ``backbone`` is what the evaluation runs: the loaded backbone itself for methods that change weights
    or hook modules, or a `Backbone` subclass sharing its model for methods that change the inputs or
    route them (in-context editing, memory-based editors). ``text_edits``: whether an edit can change
    the output on a text-only input at all; where it cannot, T-Loc is 100 by construction and the report
    says so. ``lifelong``: whether edits accumulate — after ``edit(a); edit(b)`` both are live, and one
    ``restore()`` undoes all of them (the sequential protocol, `editing.evaluation.sequential`, runs only
    such methods); a method without it holds one edit at a time.
    """

    backbone: Backbone
    text_edits: bool = True
    lifelong: bool = False

    def prepare(self, train: Sequence[EditRecord], dev: Sequence[EditRecord]) -> dict:
        """Learn whatever the method learns before editing, from ``train`` (``dev`` only to pick among
        checkpoints or to draw a curve, never to fit); returns what to report (seconds, steps, curves).
        Methods that learn nothing keep this default."""
        return {}

    def edit_report(self) -> dict:
        """What the edits made so far report beside their scores (e.g. how many of a fit reached its goal),
        kept in the method's results; methods with nothing to say keep this default."""
        return {}

    @abstractmethod
    def edit(self, request: EditRequest) -> object:
        """Apply ``request``: every forward of ``backbone`` from now on is edited."""

    @abstractmethod
    def restore(self) -> None:
        """Undo every edit: the backbone's outputs are bit-identical to the unedited model's again."""

    def close(self) -> None:
        """Undo every edit and take out whatever the method put into the backbone (hooks), for good."""
        self.restore()
