"""What the benchmarks run on: a random-initialised LLaVA with the real visual grid and prompt length,
and the shipped default LLaVA with questions from its own world.

Cost on LLaVA-1.5 is decided by sequence shape (576 visual tokens + a ~30-token prompt), not by width:
the naive sweep runs full-sequence attention for every region, the engine only the window's tokens.
So the random model keeps the real 24 × 24 grid and template and shrinks width and depth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from attrib.backbones.build import BackboneSizes, build_backbone
from attrib.backbones.loader import Backbone, load_backbone
from attrib.backbones.spec import get_spec
from attrib.backbones.tokenizer import train_bpe_tokenizer
from attrib.io import stored_path
from attrib.prompts import load_prompts

# VQA-v2-like questions; wrapped by the VisEdit protocol into "USER: <image>\n{q} The answer is: ASSISTANT:".
QUESTIONS = (
    "What is the man on the left holding in his right hand?",
    "What color is the umbrella next to the bench?",
    "How many people are sitting at the table?",
    "Is the dog in the picture wearing a collar?",
    "What kind of vehicle is parked in front of the building?",
    "Which sport is being played on the field?",
    "What is written on the sign above the door?",
    "Where is the cat sleeping?",
)


@dataclass(frozen=True)
class BenchShapes:
    """The random LLaVA to build and the sweep to run on it.

    Full: CLIP 336 px / patch 14 (24 × 24 = 576 visual tokens), LM 256 wide × 4 layers × 4 heads,
    VisEdit's official noise (window r = 3, σ = 0.7 absolute, 10 draws). Quick: a 4 × 4 grid for tests.
    """

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_mlp: int = 688  # LLaVA-1.5-7B's MLP ratio (11008 / 4096)
    vocab_size: int = 800
    radius: int = 3
    sigma: float = 0.7
    draws: int = 10
    region_subset: int = 48  # regions the naive sweep is timed on (evenly spread); the engine runs all
    trace_batch: int = 4
    inner: int = 1  # calls averaged per timing sample of the fast forward / trace comparisons
    vead_layers: int = 32  # the editing benchmark keeps LLaVA-1.5-7B's layer count (the adapter's share)
    vead_edit_layer: int = 18  # the paper's LLaVA edit layer (of 32)

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    def sizes(self) -> BackboneSizes:
        return BackboneSizes(
            image_size=self.image_size, patch_size=self.patch_size, vision_hidden=self.vision_hidden,
            vision_layers=self.vision_layers, vision_heads=self.vision_heads, vision_mlp=4 * self.vision_hidden,
            text_hidden=self.text_hidden, text_layers=self.text_layers, text_heads=self.text_heads,
            text_mlp=self.text_mlp, max_positions=2 * self.grid_side ** 2 + 256,
        )

    def describe(self) -> dict:
        return {**asdict(self), "grid": [self.grid_side, self.grid_side], "visual_tokens": self.grid_side ** 2}


FULL_SHAPES = BenchShapes()
QUICK_SHAPES = BenchShapes(image_size=32, patch_size=8, vision_hidden=32, text_hidden=32, text_layers=2,
                           text_heads=2, text_mlp=64, vocab_size=400, radius=1, draws=3, region_subset=16,
                           trace_batch=2, inner=2, vead_layers=3, vead_edit_layer=1)


@dataclass
class BenchModel:
    """A backbone with the images and prompts a benchmark feeds it (one image per prompt)."""

    label: str
    backbone: Backbone
    images: list[Image.Image]
    prompts: list[str]
    note: str = ""


def vqa_prompt(question: str) -> str:
    """The VisEdit E-VQA prompt (the backbone's template then adds "USER: <image>\\n ... ASSISTANT:")."""
    return load_prompts()["vqa"].format(src=question)


def random_images(count: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def random_llava(shapes: BenchShapes, n_prompts: int, seed: int = 0) -> BenchModel:
    """A seeded random-initialised `LlavaForConditionalGeneration` at ``shapes`` with VQA prompts."""
    prompts = [vqa_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(n_prompts)]
    spec = get_spec("llava")
    # The tokenizer sees the questions and template, so prompt lengths come out close to a real LLaMA's.
    corpus = [spec.prompt_template.format(prompt=p) for p in prompts] + list(QUESTIONS)
    tokenizer = train_bpe_tokenizer(corpus * 20, vocab_size=shapes.vocab_size)
    model, processor = build_backbone("llava", shapes.sizes(), tokenizer, seed=seed)
    images = random_images(n_prompts, shapes.image_size, seed)
    return BenchModel("random LLaVA", Backbone(model, processor, spec), images, prompts)


def default_llava(path: Path, n_prompts: int, seed: int = 0) -> BenchModel:
    """The shipped default LLaVA with world scenes and questions it was trained on (``path`` must exist)."""
    from attrib.world import WorldConfig, WorldSampler

    backbone = load_backbone("llava", path)
    items = WorldSampler(WorldConfig(), seed=seed).vqa_batch(n_prompts)
    return BenchModel("default LLaVA", backbone, [item.image for item in items],
                      [vqa_prompt(item.qas[0].question) for item in items], note=stored_path(path))
