"""``none``: the unedited model, the floor every editor's Rel / Gen is read against."""
from __future__ import annotations

from editing.editor import Editor, EditRequest
from editing.methods import MethodContext


class NoEdit(Editor):
    """Takes edits and does nothing with them."""

    text_edits = False
    lifelong = True

    def __init__(self, context: MethodContext):
        self.backbone = context.backbone

    def edit(self, request: EditRequest) -> None:
        return None

    def restore(self) -> None:
        return None


def build(context: MethodContext) -> NoEdit:
    return NoEdit(context)
