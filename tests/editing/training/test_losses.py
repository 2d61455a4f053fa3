"""The training losses on hand-made numbers."""
from __future__ import annotations

import math

import torch

from editing.training import losses


def test_nll_and_kl_use_only_real_positions():
    logp = torch.log_softmax(torch.tensor([[[2.0, 0.0], [0.0, 0.0]]]), -1)  # [1, 2, 2]
    labels, mask = torch.tensor([[0, 1]]), torch.tensor([[True, False]])
    assert math.isclose(losses.target_nll(logp, labels, mask).item(), -logp[0, 0, 0].item(), rel_tol=1e-6)
    assert losses.locality_kl(logp, logp, mask).item() == 0.0
    other = torch.log_softmax(torch.zeros(1, 2, 2), -1)
    p = logp[0, 0].exp()
    expected = (p * (logp[0, 0] - other[0, 0])).sum().item()
    assert math.isclose(losses.locality_kl(logp, other, mask).item(), expected, rel_tol=1e-6)


def test_im_losses():
    logits = torch.tensor([[0.0, 0.0]])
    assert math.isclose(losses.im_alignment(logits, torch.tensor([[1.0, 0.0]])).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(losses.im_up(logits).item(), math.log(2), rel_tol=1e-6)
    assert losses.im_up(torch.tensor([50.0])).item() < 1e-6 and losses.im_down(torch.tensor([-50.0])).item() < 1e-6
    assert torch.isfinite(losses.im_down(torch.tensor([200.0])))  # no log(0)


def test_influence_weighted_im_up_ignores_unweighted_tokens():
    logits = torch.tensor([[3.0, -40.0], [0.0, 0.0]])
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    expected = (-torch.nn.functional.logsigmoid(torch.tensor(3.0)).item() + math.log(2)) / 2
    assert math.isclose(losses.im_up(logits, weights).item(), expected, rel_tol=1e-6)
    assert losses.im_up(logits).item() > 10  # unweighted, the closed token dominates
