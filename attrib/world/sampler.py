"""Online sampler for training the small VLLMs: fresh scenes, questions, captions and facts on demand.

Only training templates and the training caption prompt are ever produced here, so the held-out
templates stay unseen until the T-Gen test. Nothing is cached: a scene renders in well under a
millisecond, cheaper than reading a PNG back.

    sampler = WorldSampler(WorldConfig(), seed=0)
    for image, qas in sampler.vqa_batch(32, questions_per_image=2):
        for question, answer, family in qas: ...
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
from PIL import Image

from .facts import FACTS
from .questions import CAPTION_PROMPT, caption, sample_question
from .scene import Scene, WorldConfig, generate_scene, render
from .templates import TRAIN


class QA(NamedTuple):
    """One question about an image with its one-word answer and its family."""

    question: str
    answer: str
    family: str


class VqaItem(NamedTuple):
    """An image (PIL RGB, or uint8 [H, W, 3] with as_array) and questions about it."""

    image: Image.Image | np.ndarray
    qas: list[QA]


class CaptionItem(NamedTuple):
    """An image, the caption prompt ("a photo of") and the true caption."""

    image: Image.Image | np.ndarray
    prompt: str
    caption: str


class WorldSampler:
    """Endless stream of training examples from one seed.

    min_objects / max_objects override the config's range, e.g. 3..4 for a harder test stream.
    Two samplers with the same arguments produce the same sequence of batches.
    """

    def __init__(
        self,
        config: WorldConfig = WorldConfig(),
        seed: int = 0,
        min_objects: int | None = None,
        max_objects: int | None = None,
    ) -> None:
        # The override goes through WorldConfig, whose validation then judges the range.
        self.config = replace(
            config,
            min_objects=config.min_objects if min_objects is None else min_objects,
            max_objects=config.max_objects if max_objects is None else max_objects,
        )
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def scene(self) -> Scene:
        """A fresh random scene."""
        return generate_scene(self.rng, self.config)

    def _image(self, scene: Scene, as_array: bool) -> Image.Image | np.ndarray:
        img = render(scene)
        return np.asarray(img) if as_array else img

    def vqa_batch(self, batch_size: int, questions_per_image: int = 1, as_array: bool = False) -> list[VqaItem]:
        """`batch_size` images, each with up to `questions_per_image` distinct training questions
        (family drawn uniformly among those well-posed on the scene)."""
        items = []
        for _ in range(batch_size):
            scene = self.scene()
            qas: list[QA] = []
            # A few extra draws to find distinct questions; a 1-object scene may have fewer to offer.
            for _ in range(4 * questions_per_image):
                if len(qas) == questions_per_image:
                    break
                q = sample_question(scene, self.rng, split=TRAIN)
                if all(q.text != seen.question for seen in qas):
                    qas.append(QA(q.text, q.answer, q.family))
            items.append(VqaItem(self._image(scene, as_array), qas))
        return items

    def caption_batch(self, batch_size: int, as_array: bool = False) -> list[CaptionItem]:
        """`batch_size` (image, "a photo of", caption) triples."""
        items = []
        for _ in range(batch_size):
            scene = self.scene()
            items.append(CaptionItem(self._image(scene, as_array), CAPTION_PROMPT, caption(scene)))
        return items

    def fact_batch(self, batch_size: int) -> list[tuple[str, str]]:
        """`batch_size` (fact question, one-word answer) pairs drawn uniformly from the fact table."""
        picks = self.rng.integers(len(FACTS), size=batch_size)
        return [(FACTS[int(k)].question, FACTS[int(k)].answer) for k in picks]
