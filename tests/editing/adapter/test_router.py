"""The scene router: its contrastive loss against the plain computation, training that parts synthetic
scenes, the dev threshold, the edit bank routing by it, and the fitted router saved and reused."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from attrib.data import load_records
from editing.adapter.router import (
    RouterConfig,
    SceneRouter,
    _drawn_max,
    calibration_sizes,
    choose_threshold,
    contrastive_loss,
    fit_router,
    image_groups,
)
from editing.editor import EditRequest
from tests.editing.adapter.test_bank import GATED, PROMPT, TARGETS, _each_alone, _logits

SMALL_ROUTER = RouterConfig(hidden=32, dim=16, temperature=0.1, epochs=40, batch_size=64, lr=3e-3)


def test_contrastive_loss_equals_the_plain_computation_and_masks_same_group_negatives():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    group = torch.tensor([0, 1, 1, 2])
    sims = (a @ b.T / 0.5).tolist()

    def nce(rows, i, allowed):
        return -rows[i][i] + math.log(sum(math.exp(rows[i][j]) for j in allowed))

    cols = [list(c) for c in zip(*sims)]
    expected = 0.0
    for i in range(4):
        allowed = [j for j in range(4) if j == i or group[j] != group[i]]
        expected += 0.5 * (nce(sims, i, allowed) + nce(cols, i, allowed)) / 4
    assert contrastive_loss(a, b, group, 0.5).item() == pytest.approx(expected, rel=1e-5)


def _scenes(generator, n, tokens=6, width=12, parts=5):
    """Synthetic visual states: a scene is a set of ``parts`` object vectors among ``tokens`` slots; its
    rendering shuffles the slots and adds noise (what an image rephrase does to the tokens)."""
    objects = torch.randn(n, parts, width, generator=generator)

    def render():
        out = torch.zeros(n, tokens, width)
        for i in range(n):
            slots = torch.randperm(tokens, generator=generator)[:parts]
            out[i, slots] = objects[i] * (0.8 + 0.4 * torch.rand(parts, 1, generator=generator))
        return out + 0.05 * torch.randn(n, tokens, width, generator=generator)

    return render, objects


def test_a_fitted_router_sends_each_rerendering_to_its_own_scene_and_others_to_none():
    generator = torch.Generator().manual_seed(1)
    render, _ = _scenes(generator, 400)
    first, second = render(), render()
    router = SceneRouter(12, 6, SMALL_ROUTER)
    losses = fit_router(router, first[:300], second[:300], list(range(300)))
    assert losses[-1] < 0.5 * losses[0]
    report = choose_threshold(router, first[300:350], second[300:350], render()[350:400],
                              (list(range(300, 350)), list(range(350, 400))), stored=first[:300],
                              stored_groups=list(range(300)))
    assert report["dev_rephrase_closest_is_own"] >= 90 and report["dev_unrelated_routed_to_none"] >= 90
    assert router.threshold_for(10_000).item() == pytest.approx(report["threshold"], abs=1e-4)
    sizes = [row["bank_size"] for row in report["by_bank_size"]]
    assert sizes == [1, 10, 100, 350] and router.bank_sizes.tolist() == sizes
    thresholds = [row["threshold"] for row in report["by_bank_size"]]
    assert [router.threshold_for(n).item() for n in (1, 2, 10, 11, 100, 101, 350)] == pytest.approx(
        [thresholds[0], thresholds[1], thresholds[1], thresholds[2], thresholds[2], thresholds[3], thresholds[3]],
        abs=1e-4)
    assert thresholds[0] <= thresholds[-1]  # one stored image is less to come close to than 350
    alone = report["by_bank_size"][0]
    assert alone["dev_rephrase_routed_to_own"] >= report["dev_rephrase_routed_to_own"]
    assert alone["dev_rephrase_closest_is_own"] == 100.0  # nothing else stored: its own edit is closest
    scores = router.scores(second[300:350], router(first[300:350]))
    assert (scores.argmax(1) == torch.arange(50)).float().mean() >= 0.9
    again = SceneRouter(12, 6, SMALL_ROUTER)
    fit_router(again, first[:300], second[:300], list(range(300)))
    fitted, refitted = router.state_dict(), again.state_dict()
    assert all(torch.equal(fitted[k], refitted[k]) for k in fitted if k not in ("thresholds", "bank_sizes"))


def test_the_embedding_pools_before_the_last_linear_layer_as_after_it():
    router = SceneRouter(12, 6, SMALL_ROUTER)
    with torch.no_grad():
        router.reference.normal_(generator=torch.Generator().manual_seed(4))
        visual = torch.randn(5, 6, 12, generator=torch.Generator().manual_seed(5))
        per_token = router.token(visual - router.reference).mean(1)  # every token through every layer
        straightforward = torch.nn.functional.normalize(router.out(per_token), dim=-1)
        torch.testing.assert_close(router(visual), straightforward, rtol=0, atol=1e-6)


def test_drawn_max_equals_the_max_over_the_k_entries_drawn_first_per_row():
    cos = torch.randn(5, 9, generator=torch.Generator().manual_seed(3))
    excluded = torch.zeros(5, 9, dtype=torch.bool)
    excluded[0, :8] = True  # one entry left: k larger than what is left takes it
    excluded[1] = True  # nothing left: -inf
    excluded[2, [1, 4]] = True
    for k in (0, 1, 3, 20):
        keys = torch.rand(cos.shape, generator=torch.Generator().manual_seed(7))
        expected = []
        for row in range(5):
            allowed = [j for j in range(9) if not excluded[row, j]]
            drawn = sorted(allowed, key=lambda j: keys[row, j].item())[:k]
            expected.append(max((cos[row, j].item() for j in drawn), default=float("-inf")))
        got = _drawn_max(cos, excluded, k, torch.Generator().manual_seed(7))
        assert got.tolist() == pytest.approx(expected)


def test_calibration_sizes_are_powers_of_ten_then_the_largest_bank():
    assert calibration_sizes(1) == [1] and calibration_sizes(10) == [1, 10]
    assert calibration_sizes(3100) == [1, 10, 100, 1000, 3100]


def test_choose_threshold_ignores_stored_images_of_a_rows_own_group():
    router = SceneRouter(4, 1, RouterConfig(hidden=4, dim=4))  # untrained: equal states, equal embeddings
    generator = torch.Generator().manual_seed(0)
    edit = torch.randn(3, 1, 4, generator=generator)
    rephrase = edit + 0.01 * torch.randn(3, 1, 4, generator=generator)
    stored = rephrase.clone()  # stored images closer to each rephrase than its own edit image is
    same = choose_threshold(router, edit, rephrase, edit + 5.0, ([0, 1, 2], [7, 8, 9]), stored, [0, 1, 2])
    assert same["dev_rephrase_closest_is_own"] == 100.0  # of the row's own group: not competitors
    other = choose_threshold(router, edit, rephrase, edit + 5.0, ([0, 1, 2], [7, 8, 9]), stored, [3, 4, 5])
    assert other["dev_rephrase_closest_is_own"] == 0.0  # another group's stored image is closer


class _LookupRouter(SceneRouter):
    """A router whose embedding is a one-hot of the known state it equals (none: a zero vector)."""

    def __init__(self, known: torch.Tensor, threshold: float = 0.5):
        super().__init__(known.shape[-1], known.shape[1], RouterConfig(hidden=4, dim=len(known)))
        self.known = known
        self.set_thresholds([1], [threshold])

    def forward(self, visual):
        match = (visual[:, None].to(self.known.dtype) - self.known[None]).abs().flatten(2).amax(2) < 1e-4
        return match.float()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]


def test_the_bank_routes_by_the_router_and_leaves_unrouted_rows_unedited(tiny_backbone, images, make_editor):
    editor = make_editor(tiny_backbone, -1, GATED)
    with torch.no_grad():  # a gate wide open, so that only the router decides
        editor.adapter.scene.log_scale.fill_(math.log(1000.0))
        editor.adapter.scene.threshold.fill_(-1.0)
    states = editor.edit_signal([EditRequest(im, PROMPT, "x") for im in images]).visual_states()
    plain = _logits(tiny_backbone, images)
    alone = _each_alone(editor, tiny_backbone, images)
    editor.hook.bank.router = _LookupRouter(states[:3].detach())
    for i in (2, 0, 1):  # stored out of order: routing follows the images, not the order
        editor.edit(EditRequest(images[i], PROMPT, TARGETS[i]))
    together = _logits(tiny_backbone, images)
    for i in range(3):
        torch.testing.assert_close(together[i], alone[i][0], rtol=0, atol=1e-5)
    assert torch.equal(together[3], plain[3])  # no stored image: the router sends it nowhere
    best, _, keep = editor.hook.bank.route(states.detach())
    assert best[:3].tolist() == [1, 2, 0] and keep.tolist() == [True, True, True, False]
    editor.restore()
    assert torch.equal(_logits(tiny_backbone, images), plain)


def test_image_groups_are_world_scenes_or_files(tiny_world, tmp_path):
    records = load_records(tiny_world / "vqa_eval.json")
    groups = image_groups(records)
    assert all(isinstance(g, tuple) for g in groups)
    assert image_groups(records, "image_rephrase") == groups  # a rephrase shows the same scene


def test_routing_weight_is_the_routed_edits_own_scene_gate(tiny_backbone, images, make_editor):
    editor = make_editor(tiny_backbone, -1, GATED)
    with torch.no_grad():  # a gate between shut and open, so its value shows
        editor.adapter.scene.log_scale.fill_(math.log(3.0))
        editor.adapter.scene.threshold.fill_(0.5)
    requests = [EditRequest(im, PROMPT, TARGETS[i]) for i, im in enumerate(images)]
    signals = [editor.edit_signal(r) for r in requests]
    states = torch.cat([s.visual_states() for s in signals]).detach()
    editor.hook.bank.router = _LookupRouter(states[:3])
    for i in (2, 0, 1):
        editor.edit(requests[i])
    best, weight, _ = editor.hook.bank.route(states)
    expected = [torch.sigmoid(editor.adapter.scene_logits(states[i:i + 1], signals[i])).item() for i in range(3)]
    assert best[:3].tolist() == [1, 2, 0]
    assert weight[:3].tolist() == pytest.approx(expected, abs=1e-6)
    editor.restore()
