"""Fixtures of the editing tests: small adapter sizes, editors that take their hooks out afterwards
(the tiny backbones are shared by the whole session), and a tiny synthetic world on disk."""
from __future__ import annotations

import pytest

from attrib.world import write_world
from editing.adapter.vead import VeadConfig
from editing.adapter.visedit import VisEditEditor

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


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world") / "w", seed=0, n_train=2, n_eval=3, n_caption_train=1,
                       n_caption_eval=1)
