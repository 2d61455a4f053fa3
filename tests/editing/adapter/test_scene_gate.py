"""The scene gate's similarities against loops over tokens, and its starting point."""
from __future__ import annotations

import math

import pytest
import torch

from editing.adapter.scene_gate import SCENE_SIMILARITIES, SceneGate, chamfer_similarity, salient_chamfer


def test_chamfer_similarity_equals_the_loop_over_tokens():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 5, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    for row in range(2):
        best_a = [max(cos(a[row, i], b[row, j]) for j in range(3)) for i in range(5)]
        best_b = [max(cos(a[row, i], b[row, j]) for i in range(5)) for j in range(3)]
        expected = 0.5 * (sum(best_a) / 5 + sum(best_b) / 3)
        assert abs(chamfer_similarity(a, b)[row].item() - expected) < 1e-6
    # The same set of tokens in another order is the same scene.
    assert torch.allclose(chamfer_similarity(a, a[:, [4, 2, 0, 1, 3]]), torch.ones(2))


def test_salient_chamfer_equals_the_weighted_loop_over_centred_tokens():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    reference = torch.randn(5, 8, generator=g)
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    for row in range(2):
        x, y = a[row] - reference, b[row] - reference
        wx, wy = [float(t @ t) for t in x], [float(t @ t) for t in y]
        best_x = [max(cos(x[i], y[j]) for j in range(5)) for i in range(5)]
        best_y = [max(cos(x[i], y[j]) for i in range(5)) for j in range(5)]
        weighted = lambda w, c: sum(wi * ci for wi, ci in zip(w, c)) / sum(w)  # noqa: E731
        expected = 0.5 * (weighted(wx, best_x) + weighted(wy, best_y))
        assert abs(salient_chamfer(a, b, reference)[row].item() - expected) < 1e-5
    # What every image has at a position drops out: a per-position offset on both images and the reference
    # changes nothing, though it changes the plain chamfer.
    offset = 5 * torch.randn(5, 8, generator=g)
    torch.testing.assert_close(salient_chamfer(a + offset, b + offset, reference + offset),
                               salient_chamfer(a, b, reference))
    assert not torch.allclose(chamfer_similarity(a + offset, b + offset), chamfer_similarity(a, b))
    # A token at the reference carries no weight: background does not vote.
    quiet = a.clone()
    quiet[:, 0] = reference[0]
    moved = quiet.clone()
    moved[:, 0] = reference[0] + 1e-4 * torch.randn(8, generator=g)
    torch.testing.assert_close(salient_chamfer(quiet, b, reference), salient_chamfer(moved, b, reference),
                               atol=1e-5, rtol=0)
    # An image at the reference everywhere has nothing salient to match: similarity 0, never NaN.
    plain = reference.expand(2, -1, -1)
    torch.testing.assert_close(salient_chamfer(plain, plain, reference), torch.zeros(2))
    torch.testing.assert_close(salient_chamfer(plain, b, reference), torch.zeros(2))


@pytest.mark.parametrize("similarity", SCENE_SIMILARITIES)
def test_the_gate_starts_at_its_documented_scale_and_threshold(similarity):
    gate = SceneGate(similarity)
    assert gate.log_scale.item() == pytest.approx(math.log(SceneGate.INIT_SCALE))
    assert gate.threshold.item() == pytest.approx(SceneGate.INIT_THRESHOLD[similarity])
    a = torch.randn(1, 4, 8)
    if similarity == "salient":
        gate.set_reference(torch.zeros(4, 8))
    # An image against itself: similarity 1, so the gate's logit is α(1 − β) > 0 (open).
    assert gate(a, a).item() == pytest.approx(SceneGate.INIT_SCALE * (1 - SceneGate.INIT_THRESHOLD[similarity]),
                                             rel=1e-4)
