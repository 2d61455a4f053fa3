"""Fixtures of the editing tests: small adapter sizes, editors that take their hooks out afterwards
(the tiny backbones are shared by the whole session), the tiny LLaVA loaded once per module (for tests
that change its weights or hooks), and a tiny synthetic world on disk."""
from __future__ import annotations

import pytest

from attrib.backbones.loader import load_backbone
from attrib.world import write_world
from editing.adapter.vead import VeadConfig
from editing.adapter.visedit import VisEditEditor
from editing.editor import Editor

SMALL = VeadConfig(mid_dim=16, n_heads=2, im_hidden=16, im_heads=2)


@pytest.fixture
def make_editor():
    """``make_editor(backbone, placement, config=SMALL, **kw)``; every editor is removed at teardown."""
    made = []

    def make(backbone, placement, config=SMALL, **kwargs) -> VisEditEditor:
        editor = VisEditEditor(backbone, placement, config, **kwargs)
        made.append(editor)
        return editor

    yield make
    for editor in made:
        editor.remove()


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    return load_backbone("llava", tiny_dirs["llava"])


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world") / "w", seed=0, n_train=2, n_eval=3, n_caption_train=1,
                       n_caption_eval=1)


class FlagEditor(Editor):
    """An editor that changes nothing itself: ``edit`` sets ``edited``, ``restore`` clears it, and a test
    decides what the flag does (or nothing, for an edit that changes nothing)."""

    def __init__(self, backbone):
        self.backbone, self.edited = backbone, False

    def edit(self, request):
        self.edited = True

    def restore(self):
        self.edited = False


def one_token_everywhere(monkeypatch, backbone, token: int = 7) -> FlagEditor:
    """A `FlagEditor` whose edit makes every image row of ``backbone`` answer ``token`` at every position."""
    editor = FlagEditor(backbone)
    forward = backbone.forward

    def edited_forward(inputs, **kwargs):
        out = forward(inputs, **kwargs)
        if editor.edited and inputs.get("pixel_values") is not None:
            out.logits[..., token] += 1e4
        return out

    monkeypatch.setattr(backbone, "forward", edited_forward)
    return editor
