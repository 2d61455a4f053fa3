"""Re-rendered variants of a scene that keep a question's answer (or a caption) the same: `image_rephrase`.

A variant has a new background and new colour jitter, and its objects moved (and, where size does not
matter, rescaled). Each proposal is checked by re-asking the question on it, so a variant is correct by
construction rather than by reasoning about each family; when no proposal passes, the scene is only
restyled (same places, new background and jitter), which keeps every answer.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .questions import Question, caption, evaluate
from .scene import SIZES, Scene, WorldConfig, move_object, relayout, restyle

_TRIES = 20  # proposals before falling back to a restyled copy
_STEPS_PER_OBJECT = 4  # random-walk steps per object in a small-move proposal


def _boxes(scene: Scene) -> tuple:
    return tuple(o.box for o in scene.objects)


def _order_kept(before: Scene, after: Scene) -> bool:
    """No pair of objects swaps sides: left/right and above/below by box centre stay as they were."""
    n = len(before.objects)
    for i in range(n):
        for j in range(i + 1, n):
            for axis in (0, 1):
                old = before.objects[i].center[axis] - before.objects[j].center[axis]
                new = after.objects[i].center[axis] - after.objects[j].center[axis]
                if old * new < 0:
                    return False
    return True


def _walk(
    scene: Scene, rng: np.random.Generator, config: WorldConfig, resize: bool, accept: Callable[[Scene], bool]
) -> Scene:
    """Random walk on the layout: move one object at a time by up to one patch (and, with `resize`,
    redraw its size), keeping only the steps `accept` approves. Every kept state is a valid layout."""
    current = scene
    for _ in range(_STEPS_PER_OBJECT * len(scene.objects)):
        k = int(rng.integers(len(current.objects)))
        dx, dy = (int(v) for v in rng.integers(-1, 2, size=2))
        size = SIZES[int(rng.integers(2))] if resize else None
        candidate = move_object(current, k, dx, dy, size, config)
        if candidate is not None and accept(candidate):
            current = candidate
    return current


def question_variant(
    scene: Scene, question: Question, rng: np.random.Generator, config: WorldConfig = WorldConfig()
) -> Scene:
    """A new rendering of `scene` on which `question` has the same answer about the same object.

    Position questions: objects take small steps and may change size, never letting a pair swap sides
    or the answer change. Other families: objects are re-placed anywhere with freshly drawn sizes.
    """
    expected = (question.answer, question.target)
    for _ in range(_TRIES):
        if question.family == "position":
            candidate: Scene | None = _walk(
                scene, rng, config, resize=True,
                accept=lambda s: _order_kept(scene, s) and evaluate(s, question.family, question.slots) == expected,
            )
        else:
            candidate = relayout(scene, rng, config, [SIZES[int(rng.integers(2))] for _ in scene.objects])
        if candidate is None or _boxes(candidate) == _boxes(scene):
            continue
        if evaluate(candidate, question.family, question.slots) == expected:
            return restyle(candidate, rng, config)
    return restyle(scene, rng, config)


def caption_variant(scene: Scene, rng: np.random.Generator, config: WorldConfig = WorldConfig()) -> Scene:
    """A new rendering with the same caption: sizes kept, objects moved in small steps that never change
    the left-to-right order (the caption's word order)."""
    text = caption(scene)
    for _ in range(_TRIES):
        candidate = _walk(scene, rng, config, resize=False, accept=lambda s: caption(s) == text)
        if _boxes(candidate) != _boxes(scene):
            return restyle(candidate, rng, config)
    return restyle(scene, rng, config)
