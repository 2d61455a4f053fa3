"""Scenes: determinism, grid snapping, separation, drawing, background."""
import io
import time

import numpy as np
import pytest

from attrib.world.scene import (
    COLORS,
    SHAPES,
    Scene,
    WorldConfig,
    WorldObject,
    generate_scene,
    layout_ok,
    move_object,
    relayout,
    render,
    render_array,
    restyle,
)

CONFIG = WorldConfig()


def _png(scene: Scene) -> bytes:
    buf = io.BytesIO()
    render(scene).save(buf, format="PNG")
    return buf.getvalue()


def _scenes(seed: int, n: int, **kw) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [generate_scene(rng, CONFIG, **kw) for _ in range(n)]


def test_same_seed_same_png_bytes_different_seed_differs():
    a, b, c = _scenes(7, 5), _scenes(7, 5), _scenes(8, 5)
    assert a == b
    assert [_png(s) for s in a] == [_png(s) for s in b]
    assert [_png(s) for s in a] != [_png(s) for s in c]


def test_objects_on_patch_grid_inside_image_and_separated():
    p = CONFIG.patch_size
    for scene in _scenes(0, 300):
        assert 1 <= len(scene.objects) <= 4
        boxes = [o.box for o in scene.objects]
        for (x0, y0, x1, y1), o in zip(boxes, scene.objects):
            assert all(v % p == 0 for v in (x0, y0, x1, y1))
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            side = {"small": 16, "large": 24}[o.size]
            assert x1 - x0 == side and y1 - y0 == side
            assert o.shape in SHAPES and o.color in COLORS
        for i, a in enumerate(boxes):
            for b in boxes[:i]:
                gap_x = max(b[0] - a[2], a[0] - b[2])
                gap_y = max(b[1] - a[3], a[1] - b[3])
                assert max(gap_x, gap_y) >= p, (a, b)


def test_object_count_range_and_crowded_scenes_fit():
    counts = {len(s.objects) for s in _scenes(1, 200)}
    assert counts == {1, 2, 3, 4}
    assert all(len(s.objects) == 4 for s in _scenes(2, 50, n_objects=4))
    assert all(len(s.objects) in (3, 4) for s in _scenes(3, 50, min_objects=3, max_objects=4))


def test_box_centre_pixel_has_the_object_colour():
    for scene in _scenes(4, 100):
        img = render_array(scene)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == o.rgb
            palette = np.array(list(COLORS.values()))
            nearest = list(COLORS)[int(np.argmin(((palette - np.array(o.rgb)) ** 2).sum(1)))]
            assert nearest == o.color


def test_every_shape_fills_most_of_its_box():
    for shape in SHAPES:
        obj = WorldObject(shape, "red", "large", (16, 16, 40, 40), COLORS["red"])
        img = render_array(Scene((obj,), background_seed=0))
        inside = (img[16:40, 16:40] == COLORS["red"]).all(-1).mean()
        assert inside > 0.35, shape  # the thinnest shapes (triangle, cross) still cover over a third


def test_background_is_low_saturation_and_varies_per_scene():
    spreads, means = [], []
    for scene in _scenes(5, 30):
        img = render_array(scene).astype(int)
        mask = np.ones((64, 64), bool)
        for o in scene.objects:
            mask[o.box[1]:o.box[3], o.box[0]:o.box[2]] = False
        bg = img[mask]
        spreads.append((bg.max(1) - bg.min(1)).mean())
        means.append(bg.mean())
    assert max(spreads) < 20  # greyish: channels stay close, unlike any palette colour
    assert np.std(means) > 5  # background brightness is randomised per scene


def test_config_validation():
    with pytest.raises(ValueError):
        WorldConfig(image_size=60)
    with pytest.raises(ValueError):
        WorldConfig(min_objects=3, max_objects=2)
    assert WorldConfig().grid == 8


def test_move_object_rejects_leaving_image_or_touching():
    obj_a = WorldObject("circle", "red", "small", (0, 0, 16, 16), COLORS["red"])
    obj_b = WorldObject("square", "blue", "small", (24, 0, 40, 16), COLORS["blue"])
    scene = Scene((obj_a, obj_b), background_seed=1)
    assert layout_ok([o.box for o in scene.objects], CONFIG)
    assert move_object(scene, 0, -1, 0, config=CONFIG) is None  # off the left edge
    assert move_object(scene, 0, 1, 0, config=CONFIG) is None  # no empty patch left between them
    assert move_object(scene, 0, 0, 2, "large", CONFIG) is None  # grown, it touches the square's corner
    moved = move_object(scene, 0, 0, 3, "large", CONFIG)
    assert moved is not None and moved.objects[0].box == (0, 24, 24, 48)


def test_relayout_and_restyle_keep_objects_identity():
    rng = np.random.default_rng(0)
    scene = _scenes(6, 1, n_objects=3)[0]
    moved = relayout(scene, rng, CONFIG)
    assert moved is not None
    assert [(o.shape, o.color, o.size) for o in moved.objects] == [(o.shape, o.color, o.size) for o in scene.objects]
    restyled = restyle(scene, rng, CONFIG)
    assert [o.box for o in restyled.objects] == [o.box for o in scene.objects]
    assert restyled.background_seed != scene.background_seed


def test_rendering_is_cheap():
    scenes = _scenes(9, 50)
    start = time.perf_counter()
    for scene in scenes:
        render(scene)
    assert (time.perf_counter() - start) / len(scenes) < 0.02  # a few ms at most, even on a busy machine
