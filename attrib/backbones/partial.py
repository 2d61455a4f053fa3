"""Partial forwards: run a backbone only as far as some hooks need, then stop.

A hook that has read what it needs raises `StopForward`; `forward_until_stopped` runs the forward, ends
quietly at that exception, and removes the hooks whatever happens. Nothing above the stopping point is
computed (e.g. the layers above an edit site, or the LM when only the vision tower's output is read).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Iterable

from torch.utils.hooks import RemovableHandle

from attrib.backbones.loader import Backbone


class StopForward(Exception):
    """Raised from a hook once a partial forward has read what it needs."""


def forward_until_stopped(backbone: Backbone, inputs, handles: Iterable[RemovableHandle],
                          context: AbstractContextManager | None = None, **kwargs) -> bool:
    """``backbone.forward(inputs, **kwargs)`` inside ``context``, ended by a hook raising `StopForward`;
    the hook ``handles`` are removed afterwards. Returns whether a hook stopped it."""
    try:
        with context if context is not None else nullcontext():
            backbone.forward(inputs, **kwargs)
        return False
    except StopForward:
        return True
    finally:
        for handle in handles:
            handle.remove()
