"""`common.output_reused`: a frozen module computes once per block and only for equal arguments."""
from __future__ import annotations

import pytest
import torch

from editing.methods.common import output_reused


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x, scale=1.0):
        self.calls += 1
        return self.linear(x) * scale


def test_equal_arguments_reuse_the_first_output_and_others_run():
    module = Counting().requires_grad_(False)
    x = torch.randn(4, 3)
    with output_reused(module):
        first = module(x)
        assert module(x.clone()) is first and module.calls == 1  # equal by value, not the same object
        assert torch.equal(module(x, scale=2.0), 2 * first) and module.calls == 2
        assert torch.equal(module(x + 1), module.linear(x + 1)) and module.calls == 3
        assert module(x) is first and module.calls == 3
    again = module(x)
    assert module.calls == 4 and again is not first and torch.equal(again, first)
    assert "forward" not in module.__dict__  # the class's forward is back


def test_a_module_with_trainable_weights_is_refused():
    with pytest.raises(ValueError, match="trainable"):
        with output_reused(Counting()):
            pass
