"""The contract every region method meets.

A region method answers, per sample, layer and image region: how much does perturbing the region change
what the model computes at the last prompt token? It is a frozen dataclass whose fields are its settings
(`describe` records them in every result) and it is one of two kinds, each run by its own engine:

- `LocalMethod` acts on one layer's last-query attention with the region's tokens changed and reads that
  attention module's output (`attrib.regions.sweep`: one capture pass per batch, no further forwards).
  Implement `local`.
- `PropagatedMethod` adds noise at a site (the input of an LM layer, or the ViT patches) and runs the
  perturbed forward to where it is read (`attrib.regions.propagated`). Implement `read_layers` and
  `effects`; say with `attention_read` what the engine must save of each read layer.

A new method is one file holding one such class, plus one line in `attrib.regions.registry`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Literal

import torch

from attrib.regions.attention import LastQueryAttention
from attrib.regions.regions import RegionSet


class RegionMethod(ABC):
    """Fields every method dataclass has: ``name`` (the default key of its results) and ``kind``
    ("local" or "propagated"). Methods that draw noise also have ``seed``."""

    name: str
    kind: str

    def describe(self) -> dict:
        """The method's settings, as recorded in its results' metadata."""
        return asdict(self)  # type: ignore[call-overload]  # every method is a dataclass


class LocalMethod(RegionMethod):
    """A method computed from one layer's clean last-query attention (`LastQueryAttention`)."""

    @abstractmethod
    def local(self, attn: LastQueryAttention, index: torch.Tensor, valid: torch.Tensor,
              site_states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Influence [C] of each region. ``index`` [C, W]: the regions' token positions in the sequence
        (-1 = padding, also marked False in ``valid`` [C, W]); ``site_states`` [P, D]: the clean attention
        inputs at the visual tokens (what a relative noise scale refers to); ``generator``: the seeded
        stream of this sample and layer."""


class PropagatedMethod(RegionMethod):
    """A method that runs perturbed forwards: noise of ``draws`` draws at scale (``rule``, ``sigma``) on
    each region's tokens at the method's site, at most ``max_batch`` perturbed rows per forward."""

    sigma: float
    rule: str
    draws: int
    seed: int
    max_batch: int
    # What the engine saves at each read layer of every perturbed forward: nothing; the attention module's
    # output at the last position ("output"); or its input at the visual tokens ("input"), for methods
    # that recompute the attention themselves from the clean captures.
    attention_read: Literal["none", "output", "input"] = "none"
    # Whether `effects` reads the last position's log-probabilities; when not, the perturbed forward stops
    # after the last read layer.
    reads_logprobs: bool = True

    def site(self, regions: RegionSet) -> str:
        """Where the noise goes: "lm" (the input of an LM layer) or "vit" (the ViT patch tokens)."""
        return regions.site

    @abstractmethod
    def read_layers(self, layers: list[int], site: str) -> list[int]:
        """The layers the maps are read at (their rows); [-1] = one map read at the output."""

    @abstractmethod
    def effects(self, logprobs: torch.Tensor, attention: dict[int, torch.Tensor], read: list[int],
                clean: dict[int, LastQueryAttention] | None, visual: torch.Tensor | None) -> torch.Tensor:
        """Influence [rows, R] of the R perturbed rows of one forward (row 0 of ``logprobs`` [1+R, V] — None
        when the method does not read them — and of each ``attention[layer]`` is the clean copy).
        ``rows``: every layer of ``read`` when the noise sits on the ViT patches, else the one layer whose
        input was perturbed. ``clean``, ``visual``: the clean last-query attention per read layer and the
        visual positions, given when ``attention_read`` is "input"."""
