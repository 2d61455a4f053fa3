"""Ground-truth validation: scoring on hand-made maps, the captum and attention baselines on the tiny
backbones, the validation artifact and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from PIL import Image, ImageDraw

from attrib.attribution import AttributionConfig
from attrib.data import load_records
from attrib.prompts import load_prompts
from attrib.regions.regions import grid_windows
from attrib.regions.result import RegionResult
from attrib.validation import (
    _cross_attention, _inputs, _key_logits, best_band, cells_in_box, count_objects, integrated_gradients_maps,
    layer_integrated_gradients_maps, per_family, random_baselines, raw_attention_maps, score_maps, select_records,
    summarise, through_cross_attention, validate, validate_main, write_validation, ValidationResult,
)
from attrib.world import WorldConfig, generate_scene, render, write_world

FAST = AttributionConfig(draws=2, causal_samples=1, causal_draws=1, window=1)
METHOD_KEYS = {"pointing_game", "mass_in_box", "best_layers", "per_layer", "per_family", "per_question"}


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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("w") / "world", seed=3, n_train=2, n_eval=6, n_caption_train=1,
                       n_caption_eval=1)


@pytest.fixture(scope="module")
def samples(world):
    records = [r for r in load_records(world / "vqa_eval.json") if r.box("image") is not None][:2]
    return records, [r.load_image() for r in records], [load_prompts()["vqa"].format(src=r.src) for r in records]


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


def test_baseline_maps_have_the_grid_shape_and_see_the_image(tiny_backbone, samples):
    records, images, prompts = samples
    rows, cols = tiny_backbone.spec.grid_shape(tiny_backbone.config)
    for result in (integrated_gradients_maps(tiny_backbone, images, prompts, steps=4),
                   layer_integrated_gradients_maps(tiny_backbone, images, prompts, steps=4)):
        assert result.maps.shape == (2, 1, rows * cols) and result.regions.shape == (rows, cols)
        assert torch.isfinite(result.maps).all() and result.maps.abs().sum() > 0
    attention = raw_attention_maps(tiny_backbone, images, prompts)
    assert attention.maps.shape == (2, tiny_backbone.n_layers, rows * cols)
    assert (attention.maps >= 0).all() and (attention.maps.sum(-1) <= 1 + 1e-5).all()


@pytest.mark.parametrize("name", ["blip2", "minigpt4"])
def test_cross_attention_is_the_qformers_own(tiny_dirs, samples, name):
    """The hook-captured cross-attention equals what the Q-Former returns with output_attentions, run by hand."""
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone(name, tiny_dirs[name])
    _, images, prompts = samples
    inputs, _ = _inputs(backbone, images, prompts)
    model = backbone.model.model if hasattr(backbone.model, "model") else backbone.model
    qformer = model.qformer
    previous = qformer.config._attn_implementation
    qformer.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            patches = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
            out = qformer(query_embeds=model.query_tokens.expand(len(images), -1, -1), encoder_hidden_states=patches,
                          encoder_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long),
                          output_attentions=True)
    finally:
        qformer.set_attn_implementation(previous)
    expected = torch.stack([a.mean(1) for a in out.cross_attentions]).mean(0)  # heads, then layers
    assert torch.allclose(_cross_attention(backbone, inputs), expected, atol=1e-6)


def test_per_query_maps_are_spread_by_the_cross_attention(tiny_dirs, samples):
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("minigpt4", tiny_dirs["minigpt4"])
    _, images, prompts = samples
    rows, cols = backbone.spec.grid_shape(backbone.config)
    cross = _cross_attention(backbone, _inputs(backbone, images, prompts)[0])[..., -rows * cols:]
    n_query = backbone.n_visual_tokens
    one_hot = torch.eye(n_query).expand(len(images), -1, -1)  # "layer" i: all weight on query i
    spread = through_cross_attention(backbone, one_hot, images, prompts, batch_size=1)
    assert torch.allclose(spread, cross, atol=1e-6)  # query i's map is its own cross-attention row
    weights = torch.rand(len(images), 3, n_query, generator=torch.Generator().manual_seed(0))
    spread = through_cross_attention(backbone, weights, images, prompts)
    for n in range(len(images)):  # straightforward: a weighted sum of the rows
        for layer in range(3):
            expected = sum(weights[n, layer, q] * cross[n, q] for q in range(n_query))
            assert torch.allclose(spread[n, layer], expected, atol=1e-5)


def test_integrated_gradients_completeness(tiny_dirs, samples):
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("llava", tiny_dirs["llava"])
    _, images, prompts = samples
    inputs, keys = _inputs(backbone, images, prompts)
    forward = _key_logits(backbone.model)
    pixels, text = inputs["pixel_values"], (inputs["input_ids"], inputs["attention_mask"])
    attr, delta = IntegratedGradients(forward).attribute(pixels, baselines=torch.zeros_like(pixels), target=keys,
                                                         additional_forward_args=text, n_steps=64,
                                                         return_convergence_delta=True)
    with torch.no_grad():
        rows = torch.arange(len(keys))
        gap = forward(pixels, *text)[rows, keys] - forward(torch.zeros_like(pixels), *text)[rows, keys]
    assert gap.abs().min() > 1e-4  # the wrapper really feeds the image (SPEC §3 pitfall)
    assert attr.flatten(1).sum(1).detach() == pytest.approx(gap.detach(), rel=0.05, abs=1e-4)
    assert delta.abs().max() <= 0.05 * gap.abs().max() + 1e-4


def test_validation_json_has_the_required_keys(tiny_backbone, world, tmp_path):
    records = load_records(world / "vqa_eval.json", n=3)
    result = validate(tiny_backbone, records, FAST, ig_steps=2, correct_only=False)
    assert result.n_samples == sum(r.box("image") is not None for r in records)
    write_validation(result, tmp_path)
    data = json.loads((tmp_path / "validation.json").read_text())
    assert set(data) == {"backbone", "n_samples", "questions", "methods", "baselines", "meta"}
    assert len(data["questions"]) == data["n_samples"] and all(q["question"] for q in data["questions"])
    assert set(data["baselines"]) == {"random_cell", "random_object"}
    baselines = {"integrated_gradients", "layer_integrated_gradients", "raw_attention", "causal_noise"}
    assert baselines <= set(data["methods"])
    primary = "attention_noise" if tiny_backbone.spec.grid_site == "lm" else "vit_noise"
    assert {primary, primary + "_cell"} <= set(data["methods"])  # window 1, so the single-cell run joins
    assert data["meta"]["methods"][primary + "_cell"]["window"] == 0
    if primary == "vit_noise":  # Q-Former backbones: both reads of the ViT noise, on single patches
        assert data["meta"]["methods"]["vit_noise_cell"]["read"] == "local"
        assert data["meta"]["methods"]["vit_noise_propagated_cell"]["read"] == "propagated"
        assert data["meta"]["methods"]["query_noise_patches"]["name"] == "attention_noise"  # per-query, placed
        assert len(data["methods"]["query_noise_patches"]["per_layer"]["layers"]) == tiny_backbone.n_layers
    else:
        assert not any(name.startswith("query_noise") for name in data["methods"])
    for name, entry in data["methods"].items():
        assert set(entry) == METHOD_KEYS, name
        assert 0 <= entry["pointing_game"] <= 100 and 0 <= entry["mass_in_box"] <= 100
        if entry["per_layer"] is not None:
            layers = entry["per_layer"]["layers"]  # the causal effect runs on every k-th layer only
            assert set(layers) <= set(range(tiny_backbone.n_layers))
            assert len(entry["best_layers"]) == min(3, len(layers))
            assert len(entry["per_layer"]["pointing_game"]) == len(layers)
        assert len(entry["per_question"]) == data["meta"]["samples_per_method"][name]
    assert (tmp_path / "validation.png").stat().st_size > 0
    assert "| raw_attention |" in (tmp_path / "validation.md").read_text()


def test_selection_filters(tiny_dirs, world):
    from attrib.backbones.loader import load_backbone

    backbone = load_backbone("blip2", tiny_dirs["blip2"])
    records = load_records(world / "vqa_eval.json")
    every, _, _, _ = select_records(backbone, records, correct_only=False)
    right, _, _, counts = select_records(backbone, records, correct_only=True)
    crowded, images, _, _ = select_records(backbone, records, correct_only=False, min_objects=3)
    assert every == [r for r in records if r.box("image") is not None]
    assert set(r.index for r in right) <= set(r.index for r in every) and counts["answered_right"] == len(right)
    assert all(count_objects(im) >= 3 for im in images) and len(crowded) <= len(every)


def test_cli_writes_the_files(tiny_dirs, world, tmp_path, capsys):
    argv = ["--backbone", "llava", "--model", str(tiny_dirs["llava"]), "--data", str(world / "vqa_eval.json"),
            "--n", "2", "--out", str(tmp_path), "--all-answers", "--ig-steps", "2"]
    assert validate_main(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"validation.json", "validation.png", "validation.md"}
    assert "validation.json" in capsys.readouterr().out
    assert validate_main(argv + ["--min-objects", "9"]) == 2  # nothing left: a one-line error
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: loading progress bars
    assert err.startswith("error: no record left") and "with 9+ objects: 0" in err


def test_importing_the_library_keeps_the_users_matplotlib_backend():
    # A notebook's inline backend must survive `import attrib...` (only the command lines pick Agg).
    code = ("import matplotlib, attrib.attribution, attrib.validation, attrib.contribution, attrib.regions.result, "
            "editing.localisation, editing.run; print(matplotlib.get_backend())")
    env = {**os.environ, "MPLBACKEND": "svg"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().lower() == "svg"
