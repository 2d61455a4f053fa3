"""Scoring maps against truth boxes on hand-made maps, the random baselines, and the tables built from the
scores (`attrib.validation.scoring`, `attrib.validation.result`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from attrib.regions.regions import grid_windows
from attrib.regions.result import RegionResult
from attrib.validation.result import ValidationResult
from attrib.validation.scoring import (
    best_band,
    cells_in_box,
    count_objects,
    per_family,
    random_baselines,
    score_maps,
    summarise,
)
from attrib.world import WorldConfig, generate_scene, render


@dataclass
class Boxed:
    """Stands in for an EditRecord: only the box (and the truth's family) is read."""

    image_box: list | None
    family: str | None = None

    def box(self, field: str = "image"):
        return self.image_box

    @property
    def truth(self):
        return None if self.family is None else {"family": self.family, "image": self.image_box}


def _result(maps: torch.Tensor, layers: list[int]) -> RegionResult:
    return RegionResult(maps, layers, grid_windows(4, 4, 0, "lm"), "hand_made")


def test_cells_in_box_use_cell_centres():
    # 64 px on a 4 x 4 grid: 16-px cells, centres at 8, 24, 40, 56.
    inside = cells_in_box((4, 4), (64, 64), [0, 0, 32, 32])
    assert inside.nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert cells_in_box((4, 4), (64, 64), [8, 8, 24, 24]).nonzero().flatten().tolist() == [0]  # 24 is exclusive


def test_pointing_game_and_mass_on_hand_made_maps():
    box = [0, 0, 32, 32]  # cells 0, 1, 4, 5
    inside_peak, outside_peak = torch.zeros(16), torch.zeros(16)
    inside_peak[5], outside_peak[15] = 1.0, 1.0
    known = torch.zeros(16)
    known[0], known[15], known[5] = 3.0, 1.0, -2.0  # the negative cell is clipped: 3 of 4 units in the box
    maps = torch.stack([torch.stack([inside_peak, outside_peak, known])])  # [N=1, L=3, C]
    scores = score_maps(_result(maps, [0, 1, 2]), [Boxed(box)], 64)
    assert scores["pointing_game"] == pytest.approx([100.0, 0.0, 100.0])
    assert scores["mass_in_box"] == pytest.approx([100.0, 0.0, 75.0])


def test_records_without_box_are_left_out_and_ties_share_credit():
    maps = torch.zeros(2, 1, 16)  # flat maps: every cell ties
    scores = score_maps(_result(maps, [-1]), [Boxed([0, 0, 32, 32]), Boxed(None)], (64, 64))
    assert scores["n_samples"] == 1
    assert scores["pointing_game"] == pytest.approx([25.0]) and scores["mass_in_box"] == pytest.approx([25.0])


def test_per_family_splits_the_best_band_scores():
    box = [0, 0, 32, 32]  # cells 0, 1, 4, 5
    hit, miss = torch.zeros(16), torch.zeros(16)
    hit[0], miss[15] = 1.0, 1.0
    # Three layers; the band is layers 1-2 for summarise (width 2 asked below by slicing).
    maps = torch.stack([torch.stack([miss, hit, hit]), torch.stack([miss, hit, miss]), torch.stack([hit, miss, miss])])
    records = [Boxed(box, "exists"), Boxed(box, "exists"), Boxed(box, "count")]
    scores = score_maps(_result(maps, [0, 1, 2]), records, 64)
    families = per_family(scores, slice(1, 3))
    assert families == {"count": {"n": 1, "pointing_game": 0.0, "mass_in_box": 0.0},
                        "exists": {"n": 2, "pointing_game": 75.0, "mass_in_box": 75.0}}
    # Over all layers the family means are the per-sample means over samples of that family.
    assert per_family(scores)["count"]["pointing_game"] == pytest.approx(100 / 3)
    assert per_family(score_maps(_result(maps, [0, 1, 2]), [Boxed(box)] * 3, 64)).keys() == {"unknown"}


def test_best_band_is_the_best_contiguous_run():
    assert best_band([0, 10, 50, 40, 45, 0]) == (2, 5)
    assert best_band([5, 1]) == (0, 2)  # fewer layers than the band: all of them
    assert best_band([7]) == (0, 1)


def _scene_image(boxes, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (120, 118, 125))
    draw = ImageDraw.Draw(image)
    for box in boxes:
        draw.rectangle([box[0] + 1, box[1] + 1, box[2] - 2, box[3] - 2], fill=(215, 40, 40))
    return image


def test_random_baselines_are_box_fraction_and_object_share():
    boxes = [[0, 0, 32, 32], [16, 0, 64, 16]]  # 4 of 16 cells; 3 of 16 cells
    images = [_scene_image([boxes[0]]), _scene_image([boxes[1], [0, 40, 16, 56]])]  # 1 and 2 objects
    baselines = random_baselines([Boxed(b) for b in boxes], images, (4, 4))
    assert baselines["random_cell"] == pytest.approx(100 * (4 / 16 + 3 / 16) / 2)
    assert baselines["random_object"] == pytest.approx(100 * (1 + 1 / 2) / 2)
    flat = score_maps(_result(torch.zeros(2, 1, 16), [-1]), [Boxed(b) for b in boxes], 64)
    assert flat["pointing_game"][0] == pytest.approx(baselines["random_cell"])  # a flat map scores chance


def test_count_objects_matches_world_scenes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = generate_scene(rng, WorldConfig())
        assert count_objects(render(scene)) == len(scene.objects)


def test_family_table_gives_a_smaller_methods_own_count():
    box = [0, 0, 32, 32]
    hit = torch.zeros(16)
    hit[0] = 1.0
    records = [Boxed(box, "exists"), Boxed(box, "exists"), Boxed(box, "count")]
    everyone = summarise(score_maps(_result(hit.expand(3, 1, 16).clone(), [-1]), records, 64))
    fewer = summarise(score_maps(_result(hit.expand(1, 1, 16).clone(), [-1]), records[1:2], 64))
    table = ValidationResult("llava", 3, {"all": everyone, "causal": fewer}, {"random_cell": 25.0}).table_markdown()
    assert "| method | count (1) | exists (2) |" in table
    assert "| all | 100.0 | 100.0 |" in table and "| causal | — | 100.0 (1) |" in table


def test_per_question_scores_and_the_misses_table():
    box = [0, 0, 32, 32]
    hit, miss = torch.zeros(16), torch.zeros(16)
    hit[0], miss[15] = 1.0, 1.0
    records = [Boxed(box, "exists"), Boxed(box, "count"), Boxed(box, "exists")]
    for record, src in zip(records, ["Is there a red circle?", "How many?", "Is there a blue square?"]):
        record.src = src
    # Layers 1-2 are the best band: sample 0 hits at both, sample 1 at one, sample 2 at neither.
    maps = torch.stack([torch.stack([miss, hit, hit]), torch.stack([hit, hit, miss]), torch.stack([hit, miss, miss])])
    band = summarise(score_maps(_result(maps, [0, 1, 2]), records, 64))
    assert band["best_layers"] == [0, 1, 2]  # three layers: the band is all of them
    assert band["per_question"]["pointing_game"] == pytest.approx([200 / 3, 200 / 3, 100 / 3])
    assert band["per_question"]["question"][1] == "How many?" and band["per_question"]["family"][1] == "count"
    first = summarise(score_maps(_result(hit.expand(1, 1, 16).clone(), [-1]), records[:1], 64))
    result = ValidationResult("llava", 3, {"band": band, "first_only": first}, {"random_cell": 25.0})
    assert [i for i, _ in result.misses()] == [0, 1, 2]
    assert result.misses()[1][1] == {"band": pytest.approx(200 / 3), "first_only": None}
    assert result.questions()[2] == {"question": "Is there a blue square?", "family": "exists"}
    table = result.table_markdown()
    assert "| 0 | exists | Is there a red circle? | 67 | · |" in table
    assert "| 1 | count | How many? | 67 |  |" in table
    perfect = ValidationResult("llava", 1, {"first_only": first}, {})
    assert perfect.misses() == [] and "| # | family | question | first_only |" in perfect.table_markdown()
