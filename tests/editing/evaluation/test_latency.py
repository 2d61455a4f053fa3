"""The forward timing behind every latency figure: encoded once, warm-ups untimed, the shortest run kept."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from editing.evaluation import latency


class Clocked:
    """A backbone whose forwards take the given durations on a fake clock."""

    def __init__(self, durations):
        self.durations, self.now, self.encoded, self.forwards = list(durations), 0.0, 0, 0

    def encode(self, images, prompts):
        self.encoded += 1
        return (images, prompts)

    def forward(self, inputs, use_cache):
        assert use_cache is False and inputs == (["i", "j"], ["p", "q"])
        self.now += self.durations[self.forwards]
        self.forwards += 1


def test_forward_seconds_is_the_shortest_timed_run_after_the_warmups(monkeypatch):
    # the warm-ups are the fastest here: were they timed, they would be the answer
    durations = [0.1] * latency.WARMUP + [0.5, 0.3, 0.7, 0.3, 0.4]
    backbone = Clocked(durations)
    monkeypatch.setattr(latency.time, "perf_counter", lambda: backbone.now)
    seconds = latency.forward_seconds(SimpleNamespace(backbone=backbone), ["i", "j"], ["p", "q"], repeats=5)
    assert seconds == pytest.approx(0.3)
    assert backbone.encoded == 1 and backbone.forwards == latency.WARMUP + 5


def test_ratio_uses_the_mean_of_before_and_after():
    assert latency.latency_ratio(3.0, 1.0, 2.0) == 2.0


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        latency.forward_seconds(SimpleNamespace(backbone=None), ["i", "j"], ["p"])
    with pytest.raises(ValueError, match="0 repeats"):
        latency.forward_seconds(SimpleNamespace(backbone=None), ["i"], ["p"], repeats=0)
