"""Partial forwards: a hook stops the forward where it has read enough, and every hook is removed after."""
from __future__ import annotations

import pytest

from attrib.backbones.loader import load_backbone
from attrib.backbones.partial import StopForward, forward_until_stopped


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    return load_backbone("llava", tiny_dirs["llava"])


def test_a_hook_stops_the_forward_and_nothing_above_runs(llava, tiny_images):
    inputs = llava.encode(tiny_images[:1], ["What is it?"])
    layers = llava.module(llava.spec.layers)
    ran = []

    def stop(module, args, output):
        raise StopForward

    handles = [layers[0].register_forward_hook(stop),
               layers[1].register_forward_hook(lambda m, a, o: ran.append(1))]
    assert forward_until_stopped(llava, inputs, handles) is True
    assert not ran and not layers[0]._forward_hooks and not layers[1]._forward_hooks
    assert forward_until_stopped(llava, inputs, []) is False  # nothing stops it: the whole forward


def test_hooks_are_removed_when_the_forward_fails(llava, tiny_images):
    inputs = llava.encode(tiny_images[:1], ["What is it?"])
    layer = llava.module(llava.spec.layers)[0]

    def fail(module, args, output):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        forward_until_stopped(llava, inputs, [layer.register_forward_hook(fail)])
    assert not layer._forward_hooks
