"""Scenes of the synthetic world: coloured shapes on an 8-px patch grid over a grey textured background.

A scene is pure data (objects with pixel boxes and jittered colours, plus the seed of its background);
`render` turns it into an RGB image. Everything random is drawn from a `numpy.random.Generator` the caller
passes in, so a recorded seed reproduces a scene bit for bit.

Boxes are `(x0, y0, x1, y1)` in pixels with x1/y1 EXCLUSIVE (numpy slicing `img[y0:y1, x0:x1]` is the
object), always multiples of the patch size, so an object covers whole ViT patches.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# Saturated and pairwise >= ~80 apart in RGB, so per-object jitter never makes one read as another
# and none is close to the low-saturation background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 215, 40),
    "purple": (145, 55, 200),
    "orange": (240, 135, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
MAX_OBJECTS = 4  # count answers are the words "one".."four"


@dataclass(frozen=True)
class WorldConfig:
    """Geometry and sampling ranges of the world.

    image_size: side of the square image in px; patch_size: ViT patch side in px (objects snap to it);
    small_patches / large_patches: object side in patches; gap_patches: empty patches required between
    any two objects (in x or in y); color_jitter: max per-channel RGB offset added to an object's colour.
    """

    image_size: int = 64
    patch_size: int = 8
    small_patches: int = 2
    large_patches: int = 3
    min_objects: int = 1
    max_objects: int = 4
    gap_patches: int = 1
    color_jitter: int = 12

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {self.min_objects}, {self.max_objects}"
            )
        if self.large_patches > self.grid:
            raise ValueError("large objects do not fit in the image")

    @property
    def grid(self) -> int:
        """Patches per image side (8 for the defaults)."""
        return self.image_size // self.patch_size

    def side_patches(self, size: str) -> int:
        """Object side in patches for a size name."""
        return {"small": self.small_patches, "large": self.large_patches}[size]


@dataclass(frozen=True)
class WorldObject:
    """One object: its categorical attributes, its pixel box and its actual (jittered) fill colour."""

    shape: str
    color: str
    size: str
    box: Box
    rgb: tuple[int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """Box centre (x, y) in px."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass(frozen=True)
class Scene:
    """A list of non-overlapping objects plus the seed of the background texture."""

    objects: tuple[WorldObject, ...]
    background_seed: int
    image_size: int = 64

    def layout_key(self) -> tuple:
        """What the scene shows, ignoring colour jitter and background: used to tell scenes apart."""
        return tuple((o.shape, o.color, o.size, o.box) for o in self.objects)

    def object_key(self) -> tuple[tuple[str, str], ...]:
        """The scene up to what an image rephrase changes (places and sizes): its (shape, colour) multiset.
        Two images with one object key are renderings of one image."""
        return tuple(sorted((o.shape, o.color) for o in self.objects))


def separated(a: Box, b: Box, gap_px: int) -> bool:
    """True when at least `gap_px` empty pixels lie between the boxes along x or along y."""
    return a[2] + gap_px <= b[0] or b[2] + gap_px <= a[0] or a[3] + gap_px <= b[1] or b[3] + gap_px <= a[1]


def layout_ok(boxes: Sequence[Box], config: WorldConfig) -> bool:
    """Boxes inside the image, on the patch grid and pairwise separated by the configured gap."""
    p, s = config.patch_size, config.image_size
    for i, b in enumerate(boxes):
        if b[0] < 0 or b[1] < 0 or b[2] > s or b[3] > s or any(v % p for v in b):
            return False
        if not all(separated(b, other, config.gap_patches * p) for other in boxes[:i]):
            return False
    return True


def _free_cells(placed: list[Box], side: int, config: WorldConfig) -> list[tuple[int, int]]:
    """Top-left patch cells where a `side`-patch object fits without touching the placed boxes."""
    p = config.patch_size
    cells = []
    for py in range(config.grid - side + 1):
        for px in range(config.grid - side + 1):
            box = (px * p, py * p, (px + side) * p, (py + side) * p)
            if all(separated(box, other, config.gap_patches * p) for other in placed):
                cells.append((px, py))
    return cells


def place_boxes(sizes: Sequence[str], rng: np.random.Generator, config: WorldConfig) -> list[Box] | None:
    """Place objects of the given sizes one by one at uniformly chosen free cells; None if one doesn't fit."""
    p = config.patch_size
    boxes: list[Box] = []
    for size in sizes:
        side = config.side_patches(size)
        cells = _free_cells(boxes, side, config)
        if not cells:
            return None
        px, py = cells[int(rng.integers(len(cells)))]
        boxes.append((px * p, py * p, (px + side) * p, (py + side) * p))
    return boxes


def jitter_rgb(color: str, rng: np.random.Generator, config: WorldConfig) -> tuple[int, int, int]:
    """The palette colour plus a uniform per-channel offset in [-color_jitter, color_jitter]."""
    offset = rng.integers(-config.color_jitter, config.color_jitter + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(COLORS[color]) + offset, 0, 255))  # type: ignore[return-value]


def _new_background_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def generate_scene(
    rng: np.random.Generator,
    config: WorldConfig = WorldConfig(),
    n_objects: int | None = None,
    min_objects: int | None = None,
    max_objects: int | None = None,
) -> Scene:
    """A random scene: object count uniform in [min_objects, max_objects] (config defaults), shape and
    colour uniform and independent (repeats allowed, so "unique" questions are sometimes ill-posed),
    size uniform over small/large, positions uniform over the free grid cells."""
    lo = config.min_objects if min_objects is None else min_objects
    hi = config.max_objects if max_objects is None else max_objects
    n = int(rng.integers(lo, hi + 1)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {n}")
    for attempt in range(100):
        # Crowded all-large layouts can dead-end; after many misses fall back to small objects,
        # which always fit (each blocks at most 16 of the 49 cells of the default grid).
        sizes = [SIZES[int(rng.integers(2))] if attempt < 50 else "small" for _ in range(n)]
        boxes = place_boxes(sizes, rng, config)
        if boxes is not None:
            break
    else:
        raise RuntimeError(f"cannot place {n} objects on a {config.grid}x{config.grid} grid")
    objects = []
    for size, box in zip(sizes, boxes):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        objects.append(WorldObject(shape, color, size, box, jitter_rgb(color, rng, config)))
    return Scene(tuple(objects), _new_background_seed(rng), config.image_size)


def restyle(scene: Scene, rng: np.random.Generator, config: WorldConfig = WorldConfig()) -> Scene:
    """Same objects at the same places, with a new background and new colour jitter."""
    objects = tuple(replace(o, rgb=jitter_rgb(o.color, rng, config)) for o in scene.objects)
    return Scene(objects, _new_background_seed(rng), scene.image_size)


def relayout(
    scene: Scene, rng: np.random.Generator, config: WorldConfig = WorldConfig(), sizes: Sequence[str] | None = None
) -> Scene | None:
    """Same objects (same order, same colours and background) at new random places, optionally with new
    sizes. None when the objects don't fit this time."""
    sizes = [o.size for o in scene.objects] if sizes is None else list(sizes)
    boxes = place_boxes(sizes, rng, config)
    if boxes is None:
        return None
    moved = tuple(replace(o, size=s, box=b) for o, s, b in zip(scene.objects, sizes, boxes))
    return replace(scene, objects=moved)


def move_object(
    scene: Scene, index: int, dx: int, dy: int, size: str | None = None, config: WorldConfig = WorldConfig()
) -> Scene | None:
    """The scene with object `index` moved by (dx, dy) patches and optionally resized (top-left corner
    kept); None when it would leave the image or come closer than the gap to another object."""
    p = config.patch_size
    obj = scene.objects[index]
    size = obj.size if size is None else size
    x0, y0 = obj.box[0] + dx * p, obj.box[1] + dy * p
    side = config.side_patches(size) * p
    objects = list(scene.objects)
    objects[index] = replace(obj, size=size, box=(x0, y0, x0 + side, y0 + side))
    if not layout_ok([o.box for o in objects], config):
        return None
    return replace(scene, objects=tuple(objects))


def render_background(seed: int, image_size: int = 64) -> np.ndarray:
    """Grey, low-saturation texture: uint8 [image_size, image_size, 3].

    A random grey level, a faint colour tint (channels differ by <= ~16, far from any palette colour),
    smooth blotches (a 5x5 field upsampled bilinearly, so no patch-aligned edges) and pixel noise.
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(80.0, 170.0)
    tint = rng.uniform(-8.0, 8.0, size=3).astype(np.float32)
    coarse = rng.normal(0.0, 14.0, size=(5, 5)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(coarse).resize((image_size, image_size), Image.Resampling.BILINEAR))
    # Uniform noise (grey: +-12, shared by the channels; colour: +-3.5) is 6x cheaper than Gaussian.
    noise = rng.random((image_size, image_size, 4), dtype=np.float32)
    img = noise[..., 1:] * 7.0
    img += noise[..., :1] * 24.0
    img += blotches[..., None]
    img += tint + np.float32(base - 12.0 - 3.5 + 0.5)  # centre both noises; +0.5 so truncation rounds
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _draw_object(draw: ImageDraw.ImageDraw, obj: WorldObject) -> None:
    """Fill the shape into its box, leaving a 1-px margin; the box centre pixel is always covered."""
    x0, y0, x1, y1 = obj.box
    # PIL coordinates are inclusive, so the last pixel inside the box is x1 - 1.
    left, t, r, b = x0 + 1, y0 + 1, x1 - 2, y1 - 2
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    if obj.shape == "circle":
        draw.ellipse((left, t, r, b), fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle((left + 1, t + 1, r - 1, b - 1), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(left, b), (r, b), (cx, t)], fill=obj.rgb)
    elif obj.shape == "diamond":
        draw.polygon([(cx, t), (r, cy), (cx, b), (left, cy)], fill=obj.rgb)
    elif obj.shape == "cross":
        half = (x1 - x0) // 6  # bar thickness = a third of the box
        draw.rectangle((left, int(cy) - half + 1, r, int(cy) + half), fill=obj.rgb)
        draw.rectangle((int(cx) - half + 1, t, int(cx) + half, b), fill=obj.rgb)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image of scene.image_size x scene.image_size px."""
    img = Image.fromarray(render_background(scene.background_seed, scene.image_size))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj)
    return img


def render_array(scene: Scene) -> np.ndarray:
    """The scene as uint8 [H, W, 3]."""
    return np.asarray(render(scene))
